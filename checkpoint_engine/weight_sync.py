"""The driver's side of the checkpoint engine: plan once, push after every update, tear down.

setup: every trainer rank reports the HF tensors it provides; the driver cuts them into buckets (one
plan shared by every member), starts `WeightReceiver`s beside each rollout engine (not in colocated
mode; with reduce_scatter and shard one per TP rank of every engine, which receives only that rank's
shard, else one per engine) and has all members join the sync group at trainer rank 0's node. push(version): opens each engine's
weight-update session, runs every member's side of the push at once, closes the session with the new
version, and optionally checks the engines' weights against the trainer's. A failed push tears the
group down and names who failed; the next push sets it up again (a dead receiver is replaced).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import ray

from checkpoint_engine.buckets import Bucket, Region, TensorMeta, plan_full, plan_owned_sliced, plan_sliced
from checkpoint_engine.config import WeightSyncConfig
from checkpoint_engine.group import SyncError
from checkpoint_engine.members import MemberFailed, gather
from checkpoint_engine.receiver import WeightReceiver
from checkpoint_engine.transports import transport


class WeightSync:
    def __init__(self, trainers: list, rollouts: list, rollout_strategies: list, config: WeightSyncConfig,
                 device: str, rollout_tp_size: int = 1,
                 tp_regions: Optional[Callable[[TensorMeta], list[Optional[Region]]]] = None):
        """`rollout_strategies[j]`: Ray scheduling strategies of engine j's bundles, one per TP rank (the
        receiver of TP rank t sits in bundle t, beside that rank's GPU). `tp_regions` (sliced transports
        only): each tensor's region per rollout TP rank (`rollout.sglang.tp_shards.region_rule`); with it
        every engine gets `rollout_tp_size` receivers."""
        self.trainers, self.rollouts, self.rollout_strategies = trainers, rollouts, rollout_strategies
        self.config, self.rollout_tp_size = config, rollout_tp_size
        self.kind = transport(config.transport)  # the Transport behind the name
        self.tp_size = rollout_tp_size if self.kind.sliced and tp_regions is not None else 1
        self.tp_regions = tp_regions
        self.transport, self.bucket_bytes, self.device = config.transport, config.bucket_bytes, device
        self.timeout_s, self.verify_checksums, self.verify_full = config.timeout_s, config.verify_checksums, config.verify_full
        self.plan: Optional[list[Bucket]] = None
        self.receivers: list = []
        self.payload_bytes = 0
        self.rendezvous: Optional[tuple[str, int]] = None  # (address, port) of the last setup

    # --- lifecycle ---------------------------------------------------------------------------------
    def _make_plan(self) -> list[Bucket]:
        provided = ray.get([t.weight_sync_provided.remote(self.kind.placed) for t in self.trainers],
                           timeout=self.timeout_s)
        tensors = {}
        for metas in provided:
            for m in metas:
                tensors.setdefault(m.name, m)
        self.payload_bytes = sum(m.nbytes for m in tensors.values())
        owned = {rank: metas for rank, metas in enumerate(provided) if metas}
        if not self.kind.sliced:
            return plan_full(owned, self.bucket_bytes)
        per_engine = self.tp_regions if self.tp_size > 1 else lambda m: [None]
        regions = lambda m: per_engine(m) * len(self.rollouts)  # noqa: E731
        receivers = len(self.rollouts) * self.tp_size
        if self.kind.placed:  # every source adds its shards into every bucket
            return plan_sliced(list(tensors.values()), regions, receivers, self.bucket_bytes)
        return plan_owned_sliced(owned, regions, receivers, self.bucket_bytes)  # each owner sends each receiver

    def _receiver_slots(self) -> list[tuple[int, int]]:
        """(engine, TP rank) of each receiver, in group order."""
        return [(j, t) for j in range(len(self.rollouts)) for t in range(self.tp_size)]

    def member_names(self) -> list[str]:
        tp = lambda t: f" TP rank {t}" if self.tp_size > 1 else ""  # noqa: E731
        return ([f"trainer rank {i}" for i in range(len(self.trainers))]
                + [f"receiver of rollout engine {j}{tp(t)}" for j, t in self._receiver_slots()[:len(self.receivers)]])

    def setup(self, attempts: int = 3) -> None:
        """Plan and join the group; a group that fails to form (its port taken between being picked and
        bound, say) is torn down and formed again on a new port, `attempts` times in all."""
        for attempt in range(attempts):
            try:
                return self._setup()
            except SyncError:
                self.teardown()
                if attempt == attempts - 1:
                    raise

    def _setup(self) -> None:
        self.teardown()
        self.plan = self._make_plan()
        # the group meets at trainer rank 0's node (rank 0 hosts the store), on a port picked there
        master_addr, master_port = ray.get(self.trainers[0].rendezvous_point.remote(), timeout=self.timeout_s)
        self.rendezvous = (master_addr, master_port)
        common = dict(master_addr=master_addr, master_port=master_port, device=self.device, timeout_s=self.timeout_s,
                      plan=self.plan, mode=self.transport, num_sources=len(self.trainers),
                      verify=self.verify_checksums)
        if not self.kind.uses_group:
            common.update(world_size=len(self.trainers), member_names=self.member_names())
            refs = [t.weight_sync_setup.remote(rollouts=self.rollouts, rank=i, **common)
                    for i, t in enumerate(self.trainers)]
        else:
            cls = ray.remote(WeightReceiver)
            self.receivers = [cls.options(num_cpus=0, scheduling_strategy=self.rollout_strategies[j][t]).remote(
                                  self.rollouts[j], self.timeout_s, engine_index=j, tp_rank=t, tp_size=self.tp_size)
                              for j, t in self._receiver_slots()]
            common.update(world_size=len(self.trainers) + len(self.receivers), member_names=self.member_names())
            members = [*(t.weight_sync_setup for t in self.trainers), *(r.setup for r in self.receivers)]
            refs = [setup.remote(rank=i, **common) for i, setup in enumerate(members)]
        self._collect(refs, "setup")

    def teardown(self) -> None:
        """Leave the group on every member (together, bounded by the timeout) and stop the receivers."""
        refs = [t.weight_sync_teardown.remote() for t in self.trainers]
        refs += [r.teardown.remote() for r in self.receivers]  # its buffers' shared memory goes with it
        try:
            gather(refs, self.member_names(), self.timeout_s, "weight sync teardown")
        except MemberFailed:
            pass  # a dead or stuck member fails the run elsewhere
        self.abandon()

    def abandon(self) -> None:
        """Drop the group without asking anyone (after a failed push, members may still be blocked in
        it): the receivers are killed, and the next push sets up a fresh group with new ones."""
        for r in self.receivers:
            ray.kill(r)
        self.receivers, self.plan = [], None

    # --- the push ----------------------------------------------------------------------------------
    def _collect(self, refs: list, what: str) -> list:
        """Every member's result; the first member to fail (or the timeout) raises at once, named."""
        try:
            return gather(refs, self.member_names(), self.timeout_s, f"weight sync {what} ({self.transport})")
        except MemberFailed as exc:
            raise SyncError(str(exc)) from exc

    def push(self, version: int) -> dict[str, float]:
        """Move the trainer's current weights into every rollout engine and stamp them `version`."""
        start = time.perf_counter()
        if self.plan is None:
            self.setup()
        ray.get([r.begin_update.remote() for r in self.rollouts], timeout=self.timeout_s)
        begun = time.perf_counter()
        done = False
        try:
            refs = [t.weight_sync_push.remote(version) for t in self.trainers]
            refs += [r.push.remote(version) for r in self.receivers]
            results = self._collect(refs, f"push v{version}")
            done = True
        except Exception:
            self.abandon()  # the next push builds a fresh group (and replaces dead receivers)
            raise
        finally:
            pushed = time.perf_counter()
            ray.get([r.end_update.remote(version if done else None) for r in self.rollouts], timeout=self.timeout_s)
        finished = time.perf_counter()
        seconds = finished - start
        sources, receivers = results[:len(self.trainers)], results[len(self.trainers):] or results
        metrics = {
            "sync_seconds": seconds,
            "sync_bytes": float(self.payload_bytes),
            "sync_buckets": float(len(self.plan)),
            "sync_gbps": self.payload_bytes / seconds / 1e9,
            "sync_gather_seconds": max(r.get("gather_seconds", 0.0) for r in sources),
            "sync_pack_seconds": max(r.get("pack_seconds", 0.0) for r in sources),
            "sync_transfer_seconds": max(r.get("transfer_seconds", 0.0) for r in results),
            "sync_load_seconds": max(r.get("load_seconds", 0.0) for r in receivers),
            # what one receiver took in: the whole payload, or one rollout TP rank's shard of it
            "sync_receiver_bytes": float(max(r.get("bytes_received", 0) for r in receivers)),
            # what the busiest member put on the wire (the transport's count; docs/weight-sync.md)
            "sync_sent_bytes_max": float(max(r.get("bytes_sent", 0) for r in results)),
            # around the members' pushes: opening and closing the engines' update sessions
            "sync_begin_seconds": begun - start,
            "sync_members_seconds": pushed - begun,
            "sync_end_seconds": finished - pushed,
        }
        if self.verify_full:
            metrics["sync_verify_seconds"] = self.verify()
        return metrics

    def replace_engine(self, index: int, engine, version: int) -> None:
        """Rollout engine `index` was started again as `engine`: give it the trainer's weights as
        `version` (a full push of its own, checksummed, then compared tensor by tensor), and have the
        next push form the group again with it."""
        self.abandon()  # the old group had the dead engine's receivers
        self.rollouts[index] = engine
        alone = WeightSync(self.trainers, [engine], [self.rollout_strategies[index]], self.config, self.device,
                           self.rollout_tp_size, self.tp_regions)
        try:
            alone.push(version)
            if not alone.verify_full:  # else the push has compared them already
                alone.verify()
        finally:
            alone.teardown()

    def verify(self) -> float:
        """Compare every engine's weights with the trainer's full state (gathered the simple way, not
        through the buckets); raise naming the parameters that differ."""
        start = time.perf_counter()
        states = ray.get([t.hf_state_dict.remote() for t in self.trainers], timeout=self.timeout_s)
        for j, rollout in enumerate(self.rollouts):
            differ = ray.get(rollout.verify_weights.remote(states[0]), timeout=self.timeout_s)
            if differ:
                raise SyncError(f"rollout engine {j} weights differ from the trainer's after the push: "
                                f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}")
        return time.perf_counter() - start
