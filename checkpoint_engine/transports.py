"""How a bucket moves from the sources that hold it to the receivers beside the rollout engines: the
transports, one class each, in a registry (`sync.transport` names one; `register_transport` adds one).

A transport sizes a member's double buffer, packs a source's contribution into it, starts the
collective for a bucket, and says which members deliver which buckets. The pipeline around it (two
slots, checksums, the end-of-push agreement) is transfer.py's `TransferMember`, passed in as `m`.
"""
from __future__ import annotations

from typing import Optional

import torch

from checkpoint_engine.buckets import Bucket, pack, trailer_bytes, write_checksum

TRANSPORTS: dict[str, "Transport"] = {}


def register_transport(cls: type["Transport"]) -> type["Transport"]:
    TRANSPORTS[cls.name] = cls()
    return cls


def transport(name: str) -> "Transport":
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {tuple(TRANSPORTS)} (got {name!r})")
    return TRANSPORTS[name]


class Transport:
    name = ""
    uses_group = True  # members join a process group (colocated: no collective, no group)
    checks_chunks = True  # receivers verify each chunk's checksum (colocated: nothing crossed a wire)
    sliced = False  # each receiver (one per rollout TP rank) gets only its slice of each tensor
    placed = False  # sources export placed shards (zeros elsewhere) that the collective sums

    def buffer_bytes(self, m, plan: list[Bucket]) -> tuple[int, int]:
        """(bytes of one receive slot, bytes of one send slot) for member `m`."""
        raise NotImplementedError

    def fill(self, m, bucket: Bucket, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Pack this source's contribution to `bucket` into the buffer the collective sends from."""
        if m.source == bucket.owner:
            chunk, data = m.slots[slot], bucket.chunk_bytes[0]
            pack(chunk, data, bucket.layout(0), tensors)
            if m.verify:
                write_checksum(chunk, data, m.source, m.num_sources)

    def start(self, m, bucket: Bucket, slot: int) -> Optional[object]:
        """Start moving `bucket` (asynchronously); returns the work to wait for, if any."""
        raise NotImplementedError

    def delivers(self, m, bucket: Bucket) -> bool:
        """Whether member `m` hands `bucket` to an engine."""
        return m.receiver is not None

    def sent_bytes(self, m, bucket: Bucket) -> int:
        """Bytes member `m` puts on the wire for `bucket` (the algorithm's count; docs/weight-sync.md)."""
        return 0


def _pack_per_receiver(m, bucket: Bucket, slot: int, tensors: dict[str, torch.Tensor]) -> None:
    """Each receiver's chunk of `bucket`, packed with this source's tensors into its send slot."""
    for r, (chunk, data) in enumerate(zip(m.send_chunks(bucket, slot), bucket.chunk_bytes)):
        pack(chunk, data, bucket.layout(r), tensors)
        if m.verify:
            write_checksum(chunk, data, m.source, m.num_sources)


def _all_chunks(m, bucket: Bucket) -> int:
    return sum(bucket.chunk_bytes) + trailer_bytes(m.num_sources) * len(bucket.chunk_bytes)


class Works:
    """Several point-to-point transfers, waited for as one."""
    def __init__(self, works: list):
        self.works = works

    def wait(self, timeout) -> bool:
        return all(w.wait(timeout) for w in self.works)


@register_transport
class Broadcast(Transport):
    """Bucket n's owner broadcasts the whole bucket; every member receives all of it (Kimi K2's
    checkpoint engine). Sources take part too, as in Kimi's design where every worker gets the full set."""
    name = "broadcast"

    def buffer_bytes(self, m, plan):
        return max((b.chunk_bytes[0] + trailer_bytes(m.num_sources) for b in plan), default=0), 0

    def start(self, m, bucket, slot):
        size = bucket.chunk_bytes[0] + trailer_bytes(m.num_sources)
        return m.group.broadcast(m.slots[slot][:size], src=bucket.owner, async_op=True)

    def sent_bytes(self, m, bucket):
        # the owner sends the bucket once (a tree or ring broadcast also has receivers forward it)
        return bucket.chunk_bytes[0] + trailer_bytes(m.num_sources) if m.source == bucket.owner else 0


@register_transport
class ReduceScatter(Transport):
    """Every member contributes its chunks for all receivers (zeros for what it does not hold); an
    integer-sum reduce-scatter gives each receiver only its own chunk."""
    name = "reduce_scatter"
    sliced = True
    placed = True

    def buffer_bytes(self, m, plan):
        tail = trailer_bytes(m.num_sources)
        own = [0 if m.receiver is None else b.chunk_bytes[m.receiver] + tail for b in plan]
        return max(own, default=0), max((_all_chunks(m, b) for b in plan), default=0)

    def fill(self, m, bucket, slot, tensors):
        if m.source is None:
            for chunk in m.send_chunks(bucket, slot):
                chunk.zero_()  # receivers add nothing (and gloo may use its inputs as scratch)
        else:
            _pack_per_receiver(m, bucket, slot, tensors)

    def sent_bytes(self, m, bucket):
        # a ring reduce-scatter: every member passes on (W - 1) / W of the full, zero-padded buffer
        world = m.group.world_size
        return _all_chunks(m, bucket) * (world - 1) // world

    def start(self, m, bucket, slot):
        chunks = [c.view(torch.int64) for c in m.send_chunks(bucket, slot)]
        empty = m.send_slots[slot][:0].view(torch.int64)
        own = m.chunk(bucket, slot)[0] if m.receiver is not None else m.slots[slot][:0]
        # members 0..S-1 (the sources) receive nothing
        return m.group.reduce_scatter(own.view(torch.int64), [empty] * m.num_sources + chunks, async_op=True)


@register_transport
class Shard(Transport):
    """Point-to-point: the owner of a bucket (the trainer rank holding its tensors whole) sends each
    receiver, one per rollout TP rank of every engine, only that rank's slices (Kimi's "reduce-scatter
    to distribute", checkpoint-engine's P2P mode). A receiver takes in 1/TP of the split tensors."""
    name = "shard"
    sliced = True

    def buffer_bytes(self, m, plan):
        tail = trailer_bytes(m.num_sources)
        own = [0 if m.receiver is None else b.chunk_bytes[m.receiver] + tail for b in plan]
        sent = [_all_chunks(m, b) for b in plan if m.source is not None and b.owner == m.source]
        return max(own, default=0), max(sent, default=0)

    def fill(self, m, bucket, slot, tensors):
        if m.source == bucket.owner:
            _pack_per_receiver(m, bucket, slot, tensors)

    def start(self, m, bucket, slot):
        works = []
        if m.source == bucket.owner:
            works += [m.group.send(chunk, m.num_sources + r, tag=bucket.index)
                      for r, chunk in enumerate(m.send_chunks(bucket, slot))]
        if m.receiver is not None:
            works.append(m.group.recv(m.chunk(bucket, slot)[0], bucket.owner, tag=bucket.index))
        return Works(works)

    def sent_bytes(self, m, bucket):
        return _all_chunks(m, bucket) if m.source == bucket.owner else 0


@register_transport
class Colocated(Transport):
    """No collective and no group: the owner of a bucket delivers it from its own slot to the engines
    beside it (shared memory on CPU, CUDA IPC on GPU). Every source is its own receiver."""
    name = "colocated"
    uses_group = False
    checks_chunks = False

    def buffer_bytes(self, m, plan):
        return max((b.chunk_bytes[0] + trailer_bytes(m.num_sources) for b in plan if b.owner == m.rank), default=0), 0

    def start(self, m, bucket, slot):
        return None

    def delivers(self, m, bucket):
        return bucket.owner == m.source

