"""Threads per actor: a node's cores shared by the job's bundles on that node (rl/cluster.py)."""
from rl.cluster import Placement, Slot


def _placement(nodes: list[tuple[str, int, int]], override=None) -> Placement:
    """`nodes`: (node id, bundles of the job there, cores there)."""
    slots = [Slot(len(s), "10.0.0.1", node, ("0",), cores) for node, bundles, cores in nodes for s in [[]] * bundles]
    slots = [Slot(i, s.node_ip, s.node_id, s.gpu_ids, s.node_cores) for i, s in enumerate(slots)]
    return Placement(pg=None, slots=slots, engine_tp=1, num_engines=len(slots), threads_per_actor=override)


def test_one_bundle_on_a_two_core_machine_gets_both_cores():
    assert _placement([("a", 1, 2)]).threads(0) == 2  # Ray's num_cpus=1 would leave one idle


def test_a_node_shares_its_cores_among_its_bundles_and_nodes_differ():
    placement = _placement([("a", 8, 128), ("b", 2, 16)])
    assert [placement.threads(i) for i in range(10)] == [16] * 8 + [8] * 2


def test_more_bundles_than_cores_still_get_one_thread_and_the_setting_overrides():
    assert _placement([("a", 4, 2)]).threads(3) == 1
    assert _placement([("a", 4, 2)], override=3).threads(0) == 3
