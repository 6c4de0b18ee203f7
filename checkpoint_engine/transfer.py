"""One member's side of a push: pack, move and deliver every bucket of a plan, double-buffered.

Group ranks 0..S-1 are sources (they hold the weights), S..S+R-1 receivers (each feeds one rollout
rank). For bucket n a member fills slot n % 2 (sources pack their tensors), starts the collective
asynchronously, and only then finishes bucket n-1: waits for its transfer, checks its checksum and
delivers it (the rollout engine loads from the slot). So packing and moving bucket n overlap loading
bucket n-1, and slot n % 2 is refilled only after bucket n-2 was delivered.

The transport (`mode`: broadcast, reduce_scatter, shard or colocated) is one of transports.py's classes.

A receiver whose chunk fails its checksum does not deliver it and remembers the bucket; at the end of
the push the members all-reduce one status word, so a mismatch anywhere fails the push on every member,
naming the bucket, its tensors and the receiver. (Once per push, not per bucket: a per-bucket
all-reduce queues behind the next bucket's collective and would serialise packing with transfer.) A
member that dies fails the collective in flight, within the timeout, on every survivor.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional

import torch

from checkpoint_engine.buckets import Bucket, TensorMeta, trailer_bytes, verify_chunk
from checkpoint_engine.group import SyncError, SyncGroup
from checkpoint_engine.transports import transport

STATUS_SHIFT = 24  # the status word: (failed bucket index + 1) << STATUS_SHIFT | (failed member rank + 1)

Produce = Callable[[Bucket], dict[str, torch.Tensor]]
# Hands a received chunk to the engine; may return a callable that waits until the engine is done
# with the chunk (its slot is not refilled before that).
# Arguments: the bucket, this receiver's layout of it, the chunk (data then checksum trailer), and
# whether it passed its checksum (a failed chunk must not be loaded; the call lets receivers that load
# together, the TP ranks of one engine, learn of it).
Deliver = Callable[[Bucket, tuple[TensorMeta, ...], torch.Tensor, bool], Optional[Callable[[], None]]]


def _buffer(nbytes: int, device: str) -> torch.Tensor:
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    if buf.device.type != "cpu":
        return buf  # CUDA memory: engines map it through CUDA IPC handles
    # CPU: shared memory that an engine maps by name (the CPU analogue of CUDA IPC). The "file_system"
    # strategy, because the default passes file descriptors through a socket that only processes
    # sharing a multiprocessing auth key (parent and child) may use, and Ray actors do not.
    from torch import multiprocessing

    multiprocessing.set_sharing_strategy("file_system")
    return buf.share_memory_()


class TransferMember:
    def __init__(self, group: Optional[SyncGroup], plan: list[Bucket], mode: str, num_sources: int,
                 verify: bool = True, rank: Optional[int] = None, device: str = "cpu"):
        """`group` is None in colocated mode, where `rank` (the source index) and `device` are given."""
        self.transport = transport(mode)
        self.group, self.plan, self.mode, self.verify = group, plan, mode, verify
        self.num_sources = num_sources
        rank = group.rank if group is not None else rank
        self.rank = rank
        self.source = rank if rank < num_sources else None
        self.receiver = rank - num_sources if rank >= num_sources else None
        self._recv_bytes, self._send_bytes = self.transport.buffer_bytes(self, plan)
        device = group.device if group is not None else device
        self.slots = [_buffer(self._recv_bytes, device) for _ in range(2)]
        self.send_slots = [_buffer(self._send_bytes, device) for _ in range(2)] if self._send_bytes else []

    @property
    def buffer_bytes(self) -> int:
        return sum(s.numel() for s in self.slots + self.send_slots)

    def release(self) -> None:
        """Give the slot buffers back; no push after this. On CPU torch removes a buffer's shared-memory
        file when its last user frees it, which a process killed at shutdown never does: each file
        would hold a slot's worth of RAM until the machine restarts."""
        self.slots, self.send_slots = [], []

    # --- one bucket --------------------------------------------------------------------------------
    def _fill(self, bucket: Bucket, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Pack this source's contribution (the transport's way); a test wraps it to corrupt a chunk."""
        self.transport.fill(self, bucket, slot, tensors)

    def send_chunks(self, bucket: Bucket, slot: int) -> list[torch.Tensor]:
        """The views of this member's send slot, one per receiver (data + trailer)."""
        tail, send, offset, chunks = trailer_bytes(self.num_sources), self.send_slots[slot], 0, []
        for data in bucket.chunk_bytes:
            chunks.append(send[offset:offset + data + tail])
            offset += data + tail
        return chunks

    def chunk(self, bucket: Bucket, slot: int) -> tuple[torch.Tensor, int]:
        """This member's received chunk of `bucket` in `slot` (data then trailer), and its data bytes."""
        data = bucket.chunk_bytes[0] if not bucket.sliced else bucket.chunk_bytes[self.receiver]
        return self.slots[slot][:data + trailer_bytes(self.num_sources)], data

    def _finish(self, bucket: Bucket, slot: int, work, deliver: Optional[Deliver], times: dict, version: int):
        """Wait for bucket's transfer, check and deliver it; returns the delivery's waiter, if any."""
        t0 = time.perf_counter()
        if work is not None:
            self.group.wait(work)
        t1 = time.perf_counter()
        times["transfer"] += t1 - t0
        status, waiter = 0, None  # status: this member's rank + 1 on a checksum mismatch
        if self.transport.delivers(self, bucket):
            chunk, data = self.chunk(bucket, slot)
            ok = not self.verify or not self.transport.checks_chunks or verify_chunk(chunk, data, self.num_sources)
            if not ok:
                status = self.rank + 1
            if deliver is not None:
                waiter = deliver(bucket, bucket.layout(self.receiver or 0), chunk, ok)
        times["load"] += time.perf_counter() - t1
        if status and not self._status:
            self._status = (bucket.index + 1) << STATUS_SHIFT | status
        return waiter

    def _agree(self, version: int, times: dict) -> None:
        """One status all-reduce after the last bucket: every member fails if any receiver saw a
        checksum mismatch, and the error names the first bucket it saw fail."""
        if self.group is None:
            return
        t = time.perf_counter()
        failed = self.group.all_reduce_max(self._status)
        times["transfer"] += time.perf_counter() - t
        if failed:
            bucket, member = self.plan[(failed >> STATUS_SHIFT) - 1], (failed & ((1 << STATUS_SHIFT) - 1)) - 1
            raise SyncError(f"weight push v{version}: bucket {bucket.index} checksum mismatch on "
                            f"{self.group.member_names[member]} (tensors {', '.join(bucket.names()[:4])}"
                            f"{', ...' if len(bucket.names()) > 4 else ''})")

    # --- the push ----------------------------------------------------------------------------------
    def push(self, version: int, produce: Optional[Produce] = None, deliver: Optional[Deliver] = None) -> dict:
        """Move every bucket of the plan. Sources pass `produce` (the tensors they hold for a bucket),
        receivers `deliver` (hand a received chunk to the engine). Returns seconds per stage and bytes."""
        times: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        pending, self._status = None, 0
        waiters: list = [None, None]  # per slot: the engine still reading it

        def free(slot: int) -> None:
            if waiters[slot] is not None:
                t = time.perf_counter()
                waiters[slot]()
                waiters[slot] = None
                times["load"] += time.perf_counter() - t

        try:
            for n, bucket in enumerate(self.plan):
                slot = n % 2
                free(slot)
                t0 = time.perf_counter()
                tensors = produce(bucket) if (produce is not None and self.source is not None) else {}
                t1 = time.perf_counter()
                self._fill(bucket, slot, tensors)
                t2 = time.perf_counter()
                times["gather"] += t1 - t0
                times["pack"] += t2 - t1
                work = self.transport.start(self, bucket, slot)
                if pending is not None:
                    waiters[pending[1]] = self._finish(*pending, deliver, times, version)
                pending = (bucket, slot, work)
            if pending is not None:
                waiters[pending[1]] = self._finish(*pending, deliver, times, version)
            free(0)
            free(1)
            self._agree(version, times)
        except SyncError:
            raise
        except Exception as exc:
            if self.group is None:
                raise SyncError(f"weight push v{version} (colocated, source {self.rank}) failed: {exc}") from exc
            raise self.group.failure(f"weight push v{version} ({self.mode}, member "
                                     f"{self.group.member_names[self.group.rank]})", exc) from exc
        received = sum(self.chunk(b, 0)[1] for b in self.plan if self.transport.delivers(self, b))
        sent = sum(self.transport.sent_bytes(self, b) for b in self.plan)
        return {"seconds": time.perf_counter() - start, "buckets": len(self.plan), "bytes_received": received,
                "bytes_sent": sent,
                **{f"{k}_seconds": v for k, v in times.items()}}
