"""Ray cluster and placement: start a local cluster or join one, reserve one bundle per GPU across the
nodes, and say which bundle holds which trainer rank and which rollout engine.

Each bundle is one GPU (logical on CPU: Ray schedules GPUs a machine does not have) plus CPUs. Trainer
rank i sits in slot i; rollout engine j of tensor-parallel size t spans slots j*t .. j*t+t-1, all on
one node, so every GPU serves rollout and training in turn (docs/scaling.md). Slots are the bundles
ordered by node, so consecutive slots share a node whatever order Ray listed the bundles in.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from checkpoint_engine.group import node_address
from rl.config import ClusterConfig

CPUS_PER_BUNDLE = 2  # Ray's accounting for a trainer rank and a rollout engine (threads: Placement.threads)
STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes use 127.0.0.1 as the node address


def start_ray(cfg: ClusterConfig, num_bundles: int) -> None:
    if ray.is_initialized():
        return
    if cfg.address is not None:
        ray.init(address=cfg.address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster needs no token
    with loopback_only():
        ray.init(num_cpus=cfg.num_cpus or CPUS_PER_BUNDLE * num_bundles, num_gpus=num_bundles,
                 include_dashboard=False, log_to_driver=True)


@contextmanager
def loopback_only():
    """A local cluster started inside listens on 127.0.0.1 only (GCS, raylet, workers, agents), and so
    does every address the job derives from it (the trainers' and the sync group's rendezvous,
    SGLang's: checkpoint_engine/group.py `node_host`). Ray does this for its local-only clusters on
    macOS and Windows; the switch is read by the processes it starts (the environment variable,
    inherited at their start) and by this one (the constant, already imported); both are restored
    after, so a multi-node cluster joined later in this process is unaffected."""
    from ray._private import ray_constants

    with mock.patch.dict(os.environ, {LOCAL_ONLY: "0"}), mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        yield


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; a container's limit shows here)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@ray.remote
def _probe() -> tuple[str, str, list[str], int]:
    """Run inside a bundle: its node's address and id, the GPU ids Ray gives that bundle, the node's cores."""
    context = ray.get_runtime_context()
    return (ray.util.get_node_ip_address(), context.get_node_id(), list(context.get_accelerator_ids().get("GPU", [])),
            usable_cores())


@ray.remote
def _rendezvous() -> tuple[str, int]:
    return node_address()


@dataclass(frozen=True)
class Slot:
    bundle: int  # the placement group's bundle index
    node_ip: str
    node_id: str
    gpu_ids: tuple[str, ...]  # what Ray assigns to the bundle (CUDA_VISIBLE_DEVICES inside it)
    node_cores: int = 1  # the cores a process on that node may use


@dataclass
class Placement:
    """The bundles of one job, in slot order (by node), and the slots each rollout engine spans."""
    pg: PlacementGroup
    slots: list[Slot]
    engine_tp: int
    num_engines: int
    threads_per_actor: Optional[int] = None  # cluster.threads_per_actor; None: threads() decides

    def threads(self, slot: int) -> int:
        """Torch threads for the trainer rank and the rollout engine of `slot`: the node's cores shared
        by the job's bundles on that node. The two actors of a bundle work in turn, so each gets the
        whole share; Ray's default (OMP_NUM_THREADS = the actor's num_cpus, 1) would leave the other
        cores idle in every phase."""
        if self.threads_per_actor is not None:
            return self.threads_per_actor
        node = self.slots[slot]
        sharing = sum(s.node_id == node.node_id for s in self.slots)
        return max(1, node.node_cores // sharing)

    def strategy(self, slot: int) -> PlacementGroupSchedulingStrategy:
        return in_bundle(self.pg, self.slots[slot].bundle)

    def engine_slots(self, engine: int) -> list[Slot]:
        return self.slots[engine * self.engine_tp:(engine + 1) * self.engine_tp]

    def engine_gpu_ids(self, engine: int) -> list[str]:
        """The GPUs engine `engine`'s worker processes see: its bundles' GPUs, in slot order."""
        return [g for s in self.engine_slots(engine) for g in s.gpu_ids]

    def rendezvous(self, slot: int = 0, timeout_s: float = 60.0) -> tuple[str, int]:
        """The node address of `slot` and a port picked on that node (not the driver's)."""
        return ray.get(_rendezvous.options(num_cpus=0, scheduling_strategy=self.strategy(slot)).remote(),
                       timeout=timeout_s)

    def table(self, world: int) -> str:
        """One line per slot: node, bundle, GPU ids, trainer rank, rollout engine (and its TP rank)."""
        rows = [("slot", "node", "bundle", "GPU ids", "threads", "trainer rank", "rollout engine")]
        for i, s in enumerate(self.slots):
            engine, tp_rank = divmod(i, self.engine_tp)
            rollout = (f"{engine}" + (f" (TP rank {tp_rank})" if self.engine_tp > 1 else "")
                       if engine < self.num_engines else "-")
            rows.append((str(i), f"{s.node_ip} {s.node_id[:8]}", str(s.bundle), ",".join(s.gpu_ids) or "-",
                         str(self.threads(i)), str(i) if i < world else "-", rollout))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def place(num_bundles: int, strategy: str, engine_tp: int, num_engines: int, timeout_s: float,
          threads_per_actor: Optional[int] = None) -> Placement:
    """Reserve `num_bundles` GPU bundles (`strategy`: pack or spread over the nodes) and order them by
    node. Raises if a rollout engine's slots would straddle two nodes."""
    pg = placement_group([{"CPU": CPUS_PER_BUNDLE, "GPU": 1}] * num_bundles, strategy=STRATEGIES[strategy])
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except Exception:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"the cluster cannot hold {num_bundles} bundles of {{GPU: 1, CPU: {CPUS_PER_BUNDLE}}} "
                           f"({strategy}) within {timeout_s:g} s; it has {ray.cluster_resources()}") from None
    node_of = placement_group_table(pg)["bundles_to_node_id"]
    probes = ray.get([_probe.options(num_cpus=0, num_gpus=0.01, scheduling_strategy=in_bundle(pg, b)).remote()
                      for b in range(num_bundles)], timeout=timeout_s)
    order = list(dict.fromkeys(node_of[b] for b in range(num_bundles)))  # nodes in first-seen order
    slots = sorted((Slot(b, ip, node_id, tuple(gpus), cores) for b, (ip, node_id, gpus, cores) in enumerate(probes)),
                   key=lambda s: (order.index(s.node_id), s.bundle))
    placement = Placement(pg, slots, engine_tp, num_engines, threads_per_actor)
    for j in range(num_engines):
        nodes = {s.node_id for s in placement.engine_slots(j)}
        if len(nodes) > 1:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"rollout engine {j} (TP {engine_tp}) would span {len(nodes)} nodes; a node must "
                               f"hold whole engines (set cluster.placement=pack or give each node a multiple of "
                               f"{engine_tp} GPUs)\n{placement.table(0)}")
    return placement
