"""One member's side of a push: pack, move and deliver every bucket of a plan, double-buffered.

Group ranks 0..S-1 are sources (they hold the weights), S..S+R-1 receivers (each feeds one rollout
rank). For bucket n a member fills slot n % 2 (sources pack their tensors), starts the collective
asynchronously, and only then finishes bucket n-1: waits for its transfer, checks its checksum and
delivers it (the rollout engine loads from the slot). So packing and moving bucket n overlap loading
bucket n-1, and slot n % 2 is refilled only after bucket n-2 was delivered.

Transports (`mode`):
- "broadcast": bucket n's owner broadcasts the whole bucket; every member receives all of it (Kimi
  K2's checkpoint engine). Sources also take part, as in Kimi's design where every worker gets the
  full set.
- "reduce_scatter": every member contributes its chunks for all receivers (zeros for what it does not
  hold); an integer-sum reduce-scatter gives each receiver only its own chunk.
- "colocated": no collective and no group; the owner of a bucket delivers it from its own slot to the
  engines beside it (shared memory on CPU, CUDA IPC on GPU). Every source is its own receiver.

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

from checkpoint_engine.buckets import Bucket, TensorMeta, pack, trailer_bytes, verify_chunk, write_checksum
from checkpoint_engine.group import SyncError, SyncGroup

MODES = ("broadcast", "reduce_scatter", "colocated")
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
        if mode not in MODES:
            raise ValueError(f"transport must be one of {MODES} (got {mode!r})")
        self.group, self.plan, self.mode, self.verify = group, plan, mode, verify
        self.num_sources = num_sources
        rank = group.rank if group is not None else rank
        self.rank = rank
        self.source = rank if rank < num_sources else None
        self.receiver = rank - num_sources if rank >= num_sources else None
        tail = trailer_bytes(num_sources)
        if mode == "colocated":
            self._recv_bytes = max((b.chunk_bytes[0] + tail for b in plan if b.owner == rank), default=0)
            self._send_bytes = 0
        elif mode == "broadcast":
            self._recv_bytes = max((b.chunk_bytes[0] + tail for b in plan), default=0)
            self._send_bytes = 0
        else:
            own = [0 if self.receiver is None else b.chunk_bytes[self.receiver] + tail for b in plan]
            self._recv_bytes = max(own, default=0)
            self._send_bytes = max((sum(b.chunk_bytes) + tail * len(b.chunk_bytes) for b in plan), default=0)
        device = group.device if group is not None else device
        self.slots = [_buffer(self._recv_bytes, device) for _ in range(2)]
        self.send_slots = [_buffer(self._send_bytes, device) for _ in range(2)] if self._send_bytes else []

    @property
    def buffer_bytes(self) -> int:
        return sum(s.numel() for s in self.slots + self.send_slots)

    # --- one bucket --------------------------------------------------------------------------------
    def _send_chunks(self, bucket: Bucket, slot: int) -> list[torch.Tensor]:
        """reduce_scatter: the views of this member's send slot, one per receiver (data + trailer)."""
        tail, send, offset, chunks = trailer_bytes(self.num_sources), self.send_slots[slot], 0, []
        for data in bucket.chunk_bytes:
            chunks.append(send[offset:offset + data + tail])
            offset += data + tail
        return chunks

    def _fill(self, bucket: Bucket, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Pack this source's contribution into the buffer the collective sends from."""
        if self.mode != "reduce_scatter":
            if self.source == bucket.owner:
                chunk, data = self.slots[slot], bucket.chunk_bytes[0]
                pack(chunk, data, bucket.layout(0), tensors)
                if self.verify:
                    write_checksum(chunk, data, self.source, self.num_sources)
            return
        for r, (chunk, data) in enumerate(zip(self._send_chunks(bucket, slot), bucket.chunk_bytes)):
            if self.source is None:
                chunk.zero_()  # receivers add nothing (and gloo may use its inputs as scratch)
            else:
                pack(chunk, data, bucket.layout(r), tensors)
                if self.verify:
                    write_checksum(chunk, data, self.source, self.num_sources)

    def _start(self, bucket: Bucket, slot: int):
        if self.mode == "colocated":
            return None
        if self.mode == "broadcast":
            size = bucket.chunk_bytes[0] + trailer_bytes(self.num_sources)
            return self.group.broadcast(self.slots[slot][:size], src=bucket.owner, async_op=True)
        chunks = [c.view(torch.int64) for c in self._send_chunks(bucket, slot)]
        empty = self.send_slots[slot][:0].view(torch.int64)
        own = self._chunk(bucket, slot)[0] if self.receiver is not None else self.slots[slot][:0]
        # members 0..S-1 (the sources) receive nothing
        return self.group.reduce_scatter(own.view(torch.int64), [empty] * self.num_sources + chunks, async_op=True)

    def _chunk(self, bucket: Bucket, slot: int) -> tuple[torch.Tensor, int]:
        data = bucket.chunk_bytes[0] if not bucket.sliced else bucket.chunk_bytes[self.receiver]
        return self.slots[slot][:data + trailer_bytes(self.num_sources)], data

    def _delivers(self, bucket: Bucket) -> bool:
        return bucket.owner == self.source if self.mode == "colocated" else self.receiver is not None

    def _finish(self, bucket: Bucket, slot: int, work, deliver: Optional[Deliver], times: dict, version: int):
        """Wait for bucket's transfer, check and deliver it; returns the delivery's waiter, if any."""
        t0 = time.perf_counter()
        if work is not None:
            self.group.wait(work)
        t1 = time.perf_counter()
        times["transfer"] += t1 - t0
        status, waiter = 0, None  # status: this member's rank + 1 on a checksum mismatch
        if self._delivers(bucket):
            chunk, data = self._chunk(bucket, slot)
            ok = not self.verify or self.mode == "colocated" or verify_chunk(chunk, data, self.num_sources)
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
                work = self._start(bucket, slot)
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
        received = sum(self._chunk(b, 0)[1] for b in self.plan if self._delivers(b))
        return {"seconds": time.perf_counter() - start, "buckets": len(self.plan), "bytes_received": received,
                **{f"{k}_seconds": v for k, v in times.items()}}
