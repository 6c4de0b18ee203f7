"""A process's membership in the checkpoint engine, set up once and reused by every push.

Trainer ranks (sources) and `WeightReceiver`s hold one `Endpoint` each; the driver
(`checkpoint_engine.engine.CheckpointEngine`) calls setup / push / teardown on all of them together.
"""
from __future__ import annotations

import io
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Optional

import torch

from checkpoint_engine.buckets import Bucket, TensorMeta
from checkpoint_engine.group import SyncGroup
from checkpoint_engine.transfer import Deliver, Produce, TransferMember


def ipc_handle(tensor: torch.Tensor) -> bytes:
    """A few hundred bytes through which another process on this node maps `tensor` without a copy
    (torch's shared-memory reduction on CPU, a CUDA IPC handle on GPU)."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(tensor)
    return buf.getvalue()


def engine_delivery(rollouts: list, timeout_s: float) -> Deliver:
    """Deliver a chunk to rollout engine actors: each loads it in place; the waiter waits for all."""
    import ray  # here, not at module level: training processes outside Ray never pay for importing it

    def deliver(bucket: Bucket, layout: tuple[TensorMeta, ...], chunk: torch.Tensor) -> Callable[[], None]:
        handle = ipc_handle(chunk)
        tensors = [(m.name, m.dtype, m.shape, m.offset) for m in layout]
        refs = [r.load_bucket.remote(handle, tensors) for r in rollouts]
        return lambda: ray.get(refs, timeout=timeout_s)
    return deliver


class Endpoint:
    def __init__(self):
        self.group: Optional[SyncGroup] = None
        self.member: Optional[TransferMember] = None

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, device: str, timeout_s: float,
              plan: list[Bucket], mode: str, num_sources: int, member_names: list[str], verify: bool) -> int:
        """Join the sync group (not in colocated mode) and allocate the double buffer; returns its bytes."""
        self.teardown()
        if mode != "colocated":
            self.group = SyncGroup(rank, world_size, master_addr, master_port, device, timeout_s, member_names)
        self.member = TransferMember(self.group, plan, mode, num_sources, verify, rank=rank, device=device)
        return self.member.buffer_bytes

    def push(self, version: int, produce: Optional[Produce] = None, deliver: Optional[Deliver] = None) -> dict:
        if self.member is None:
            raise RuntimeError("weight sync: push before setup")
        return self.member.push(version, produce, deliver)

    def teardown(self) -> None:
        group, self.group, self.member = self.group, None, None
        if group is not None:
            group.close()
