"""Scale-out with the real engines on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`: a
raylet per node, each with its own CPUs and logical GPUs): trainer ranks across nodes, a rollout engine
over each group of bundles, requests spread over the engines, weights pushed to every engine."""
import os
import sys

import pytest
import torch

NODES, GPUS_PER_NODE, CPUS_PER_NODE = 2, 2, 4


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probes below run inside actors
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _in_actor(actor, fn):
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _self: fn()), timeout=60)


def _node_id():
    import ray

    return ray.get_runtime_context().get_node_id()


def _gpu_ids():
    import ray

    return list(ray.get_runtime_context().get_accelerator_ids()["GPU"])


def _node_ip():
    import ray

    return ray.util.get_node_ip_address()


def check_placement(actors, world: int, tp: int) -> int:
    """Each engine sits on its trainer ranks' node and bundles, and its worker processes see exactly
    those bundles' GPUs; the trainers and the sync group meet at rank 0's node address. Returns the
    number of nodes the trainer ranks span."""
    import ray

    trainer_nodes = [_in_actor(t, _node_id) for t in actors.trainers]
    trainer_gpus = [_in_actor(t, _gpu_ids) for t in actors.trainers]
    assert all(len(g) == 1 for g in trainer_gpus)  # one GPU bundle per trainer rank
    # each rank and engine runs torch on its bundle's share of its node's cores, not Ray's one
    assert [_in_actor(t, torch.get_num_threads) for t in actors.trainers] == [
        actors.placement.threads(i) for i in range(len(actors.trainers))]
    from rl.trainer.megatron_cpu import PROCESS_ENV  # CPU: the allocator keeps memory between steps

    assert {_in_actor(t, lambda: os.environ.get("GLIBC_TUNABLES")) for t in actors.trainers} == {
        PROCESS_ENV["GLIBC_TUNABLES"]}
    for j, engine in enumerate(actors.rollout.engines):
        ranks = range(j * tp, (j + 1) * tp)  # the trainer ranks in this engine's bundles
        assert {trainer_nodes[i] for i in ranks} == {_in_actor(engine, _node_id)}
        assert _in_actor(engine, _gpu_ids) == trainer_gpus[ranks[0]]  # the actor itself: its first bundle
        expected = ",".join(trainer_gpus[i][0] for i in ranks)
        workers = ray.get(engine.worker_settings.remote(), timeout=120)
        assert len(workers) == tp and {w["visible_devices"] for w in workers} == {expected}, (workers, expected)
        assert {w["threads"] for w in workers} == {actors.placement.threads(j * tp)}, workers
    rank0 = _in_actor(actors.trainers[0], _node_ip)
    assert rank0 != "127.0.0.1"  # the simulated nodes share a host: loopback would also have worked
    assert actors.trainer_rendezvous[0] == rank0 and actors.sync.rendezvous[0] == rank0
    assert len(actors.placement.slots) >= world
    return len(set(trainer_nodes))


def wait_until_released(timeout_s: float = 60.0) -> None:
    """Until the cluster's CPUs and GPUs are all free again: the previous test's actors and placement
    group are released asynchronously, and `pack` places over two nodes while one is partly held."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources()
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= total[k] for k in ("CPU", "GPU")):
            return
        time.sleep(0.5)


def run_steps(ray_cluster, demo_model, run_dir, steps=2, **overrides):
    """`steps` RL steps; after each push every engine's weights are compared with the trainer's.
    Returns the metrics, each step's samples (group, response ids) and the nodes the trainers span."""
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.config import load_config
    from rl.loop import RLLoop

    config = load_config({
        "steps": steps, "model": {"path": demo_model},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, **overrides.pop("rollout", {})},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(run_dir)},
        "cluster": {"address": ray_cluster.address, "gpus_per_node": GPUS_PER_NODE, **overrides.pop("cluster", {})},
        "sync": {"verify_full": True, "bucket_mb": 0.05, **overrides.pop("sync", {})},
        **overrides,
    })
    wait_until_released()
    actors = Actors.start(config, demo_model)
    loop = None
    try:
        nodes = check_placement(actors, config.trainer.layout().world_size, config.rollout.tensor_parallel_size)
        loop = RLLoop(config, actors, AutoTokenizer.from_pretrained(demo_model))
        metrics, samples = [], []
        for _ in range(steps):
            metrics.append(loop.step())  # verify_full: the push raises if any engine differs
            samples.append([(s.group_id, s.response_ids) for s in loop.last_samples])
        return metrics, samples, nodes
    finally:
        if loop is not None:
            loop.gateway.close()
        actors.shutdown()


def served_by_every_engine(metrics, engines: int) -> None:
    for m in metrics:
        assert m["weight_version"] >= 1 and m["logprob_mismatch_max"] <= 1e-3, m
        assert all(m[f"rollout_engine{j}_tokens"] > 0 for j in range(engines)), m
        assert f"rollout_engine{engines}_tokens" not in m


@pytest.mark.integration
def test_data_parallel_trainer_across_two_nodes_with_an_engine_on_each(two_nodes, demo_model, tmp_path):
    """DP=2 spread over both nodes, one engine per node; the same seed repeats every sample."""
    settings = dict(trainer={"world_size": 2}, cluster={"placement": "spread"})
    metrics, samples, nodes = run_steps(two_nodes, demo_model, tmp_path / "a", **settings)
    assert nodes == 2
    served_by_every_engine(metrics, 2)
    _, again, _ = run_steps(two_nodes, demo_model, tmp_path / "b", **settings)
    assert again == samples


@pytest.mark.integration
def test_tensor_parallel_trainer_with_two_engines(two_nodes, demo_model, tmp_path):
    """Trainer TP=2 and two TP=1 engines over its two bundles; reduce_scatter delivers to both."""
    metrics, _, nodes = run_steps(two_nodes, demo_model, tmp_path, trainer={"tensor_parallel_size": 2},
                                  sync={"transport": "reduce_scatter"})
    assert nodes == 1  # pack: a TP group on one node
    served_by_every_engine(metrics, 2)


def shard_bytes(model_path: str, tp: int) -> int:
    """What one rollout TP rank needs of the model: its 1/TP of each split tensor, the rest whole."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from checkpoint_engine.buckets import TensorMeta, dtype_name
    from rollout.sglang.tp_shards import region_rule

    rule, total = region_rule(AutoConfig.from_pretrained(model_path), tp), 0
    for file in (f for f in os.listdir(model_path) if f.endswith(".safetensors")):
        for name, t in load_file(os.path.join(model_path, file)).items():
            region = rule(TensorMeta(name, dtype_name(t.dtype), tuple(t.shape)))[0]
            total += t.nbytes if region is None else t.nbytes // region.full * region.length
    return total


@pytest.mark.integration
def test_tensor_parallel_trainer_with_one_tensor_parallel_engine(two_nodes, demo_model, tmp_path):
    """Trainer TP=2 and one TP=2 engine whose two workers see the two bundles' GPUs. With reduce_scatter
    and with shard each worker's receiver gets only its shard; shard sends it point-to-point, so a
    receiver takes in what its rank needs (within 10%). The same seed repeats every sample, whichever
    transport carried the (bitwise equal) weights."""
    settings = dict(trainer={"tensor_parallel_size": 2}, rollout={"tensor_parallel_size": 2})
    metrics, samples, _ = run_steps(two_nodes, demo_model, tmp_path / "a", sync={"transport": "reduce_scatter"},
                                    **settings)
    served_by_every_engine(metrics, 1)
    for m in metrics:  # about half the payload per receiver (norms travel whole to both ranks)
        assert m["sync_receiver_bytes"] < 0.6 * m["sync_bytes"], m
    again, repeated, _ = run_steps(two_nodes, demo_model, tmp_path / "b", sync={"transport": "shard"}, **settings)
    assert repeated == samples
    needed = shard_bytes(demo_model, 2)
    for m in again:
        assert needed <= m["sync_receiver_bytes"] <= 1.1 * needed, (m["sync_receiver_bytes"], needed)
        assert m["sync_sent_bytes_max"] < 1.1 * m["sync_bytes"]  # the owner sends each byte once (2 halves)


@pytest.mark.integration
def test_placement_orders_bundles_by_node_and_refuses_an_engine_across_nodes(two_nodes):
    import ray

    from rl.cluster import place

    placement = place(4, "spread", engine_tp=2, num_engines=2, timeout_s=60)
    try:
        nodes = [s.node_id for s in placement.slots]
        assert nodes[0] == nodes[1] != nodes[2] == nodes[3]  # slots by node: each engine's two on one node
        assert {s.gpu_ids for s in placement.slots} == {("0",), ("1",)}
        table = placement.table(world=4)
        assert "trainer rank" in table and "0 (TP rank 1)" in table and placement.slots[0].node_ip in table
    finally:
        ray.util.remove_placement_group(placement.pg)
    # One GPU taken on each node, so a TP=2 engine's two bundles can only land on two nodes (Ray's SPREAD
    # alone is best effort: on a free cluster it sometimes packed them and nothing was refused).
    blocker = ray.util.placement_group([{"GPU": 1}] * NODES, strategy="STRICT_SPREAD")
    ray.get(blocker.ready(), timeout=60)
    try:
        with pytest.raises(RuntimeError, match="would span 2 nodes"):
            place(2, "spread", engine_tp=2, num_engines=1, timeout_s=60)
    finally:
        ray.util.remove_placement_group(blocker)
