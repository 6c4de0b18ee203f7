"""A process's membership in the checkpoint engine, set up once and reused by every push.

Trainer ranks (sources) and `WeightReceiver`s hold one `Endpoint` each; the driver
(`checkpoint_engine.weight_sync.WeightSync`) calls setup / push / teardown on all of them together.
"""
from __future__ import annotations

import io
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Optional

import torch

from checkpoint_engine.buckets import Bucket, TensorMeta
from checkpoint_engine.group import SyncGroup
from checkpoint_engine.transfer import Deliver, Produce, TransferMember
from checkpoint_engine.transports import transport


def ipc_handle(tensor: torch.Tensor) -> bytes:
    """A few hundred bytes through which another process on this node maps `tensor` without a copy
    (torch's shared-memory reduction on CPU, a CUDA IPC handle on GPU)."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(tensor)
    return buf.getvalue()


# What a rollout engine's loader needs to read one chunk in place: the chunk's IPC handle and, per
# tensor, (name, dtype, shape, offset, region), region being (dim, start, full size) or None.
ShardDescriptor = tuple[bytes, list[tuple]]


def shard_descriptor(chunk: torch.Tensor, layout: tuple[TensorMeta, ...]) -> ShardDescriptor:
    tensors = [(m.name, m.dtype, m.shape, m.offset,
                None if m.region is None else (m.region.dim, m.region.start, m.region.full)) for m in layout]
    return ipc_handle(chunk), tensors


# Starts loading a bucket into an engine from its TP ranks' chunks (one descriptor per rank, or one
# for all); returns a callable that waits until the engine is done.
Load = Callable[[list[ShardDescriptor]], Callable[[], None]]


def engine_load(rollout, timeout_s: float) -> Load:
    """Loading through a rollout engine actor (`RolloutEngine.load_bucket`), bounded by the timeout."""
    import ray  # here, not at module level: training processes outside Ray never pay for importing it

    def load(shards: list[ShardDescriptor]) -> Callable[[], None]:
        ref = rollout.load_bucket.remote(shards)
        return lambda: ray.get(ref, timeout=timeout_s)
    return load


def engine_delivery(rollouts: list, timeout_s: float) -> Deliver:
    """Deliver a chunk to rollout engine actors: each loads it in place (all its TP ranks read the same
    chunk); the waiter waits for all."""
    loads = [engine_load(r, timeout_s) for r in rollouts]

    def deliver(bucket: Bucket, layout: tuple[TensorMeta, ...], chunk: torch.Tensor, ok: bool):
        if not ok:
            return None
        waiters = [load([shard_descriptor(chunk, layout)]) for load in loads]
        return lambda: [wait() for wait in waiters]
    return deliver


class Endpoint:
    def __init__(self):
        self.group: Optional[SyncGroup] = None
        self.member: Optional[TransferMember] = None

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, device: str, timeout_s: float,
              plan: list[Bucket], mode: str, num_sources: int, member_names: list[str], verify: bool) -> int:
        """Join the sync group (not in colocated mode) and allocate the double buffer; returns its bytes."""
        self.teardown()
        if transport(mode).uses_group:
            self.group = SyncGroup(rank, world_size, master_addr, master_port, device, timeout_s, member_names)
        self.member = TransferMember(self.group, plan, mode, num_sources, verify, rank=rank, device=device)
        return self.member.buffer_bytes

    def push(self, version: int, produce: Optional[Produce] = None, deliver: Optional[Deliver] = None) -> dict:
        if self.member is None:
            raise RuntimeError("weight sync: push before setup")
        return self.member.push(version, produce, deliver)

    def teardown(self) -> None:
        group, member, self.group, self.member = self.group, self.member, None, None
        if member is not None:
            member.release()
        if group is not None:
            group.close()
