"""Bucket plans: which tensor bytes travel in which flat buffer, at which offset, to which receiver.

A push moves tensors as flat `uint8` buckets with a manifest of `TensorMeta`s, so one collective moves
many tensors of mixed dtypes (and float8 passes gloo as bytes). Two plan shapes:
- full: every receiver gets the same chunk (the whole tensors of one owner): broadcast and colocated;
- sliced: receiver r gets only its slices (for example its tensor-parallel shard), laid out in its own
  chunk; either the sources' contributions are summed by a reduce-scatter, or one owner sends each
  receiver its chunk point-to-point (see `transports.py`).

Every chunk ends with a trailer of one int64 checksum slot per source. A source writes the checksum of
what it contributed into its own slot (zeros elsewhere), so after a broadcast or an integer-sum
reduce-scatter the receiver holds the sum of all contributions' checksums, and because the checksum is
linear it must equal the checksum of the received data (`verify_chunk`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

ALIGN = 64  # byte alignment of every tensor in a chunk: views of any dtype, int64 reduction lanes


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Region:
    """The slice [start, start + length) of a full tensor along `dim`, whose full size there is `full`."""
    dim: int
    start: int
    length: int
    full: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.length)


@dataclass(frozen=True)
class TensorMeta:
    """One tensor (or one region of it) inside a chunk."""
    name: str
    dtype: str
    shape: tuple[int, ...]  # of the bytes in the chunk: the region's shape when `region` is set
    offset: int = 0
    region: Optional[Region] = None

    @property
    def nbytes(self) -> int:
        n = dtype_from_name(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    def view(self, chunk: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into `chunk` (a uint8 buffer)."""
        raw = chunk[self.offset:self.offset + self.nbytes]
        return raw.view(dtype_from_name(self.dtype)).view(self.shape)


@dataclass(frozen=True)
class Bucket:
    """One transfer. `chunks[r]` is receiver r's layout; a full bucket has one layout shared by all."""
    index: int
    chunks: tuple[tuple[TensorMeta, ...], ...]
    chunk_bytes: tuple[int, ...]  # data bytes of each chunk, aligned (the trailer follows)
    owner: Optional[int] = None  # the source rank holding every tensor in it (None: summed from all)

    @property
    def sliced(self) -> bool:
        """Each receiver has a chunk of its own (else one chunk, the same for all)."""
        return self.owner is None or len(self.chunks) > 1

    def layout(self, receiver: int) -> tuple[TensorMeta, ...]:
        return self.chunks[0] if not self.sliced else self.chunks[receiver]

    def names(self) -> list[str]:
        return sorted({m.name for chunk in self.chunks for m in chunk})


def trailer_bytes(num_sources: int) -> int:
    return 8 * num_sources


def _cut(items: list, size_of: Callable, bucket_bytes: int) -> list[list]:
    """Greedy consecutive groups of at most `bucket_bytes`; an item larger than that is alone."""
    groups, current, used = [], [], 0
    for item in items:
        size = size_of(item)
        if current and used + size > bucket_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        groups.append(current)
    return groups


def _layout(metas: list[TensorMeta]) -> tuple[tuple[TensorMeta, ...], int]:
    out, offset = [], 0
    for m in metas:
        out.append(TensorMeta(m.name, m.dtype, m.shape, offset, m.region))
        offset = _aligned(offset + m.nbytes)
    return tuple(out), offset


def plan_full(owned: dict[int, list[TensorMeta]], bucket_bytes: int) -> list[Bucket]:
    """Buckets of whole tensors, each from one owner (source rank), owners in rank order."""
    buckets: list[Bucket] = []
    for owner in sorted(owned):
        for group in _cut(owned[owner], lambda m: _aligned(m.nbytes), bucket_bytes):
            layout, size = _layout(group)
            buckets.append(Bucket(len(buckets), (layout,), (size,), owner))
    return buckets


def plan_sliced(tensors: list[TensorMeta], regions: Callable[[TensorMeta], list[Optional[Region]]],
                num_receivers: int, bucket_bytes: int, owner: Optional[int] = None, first_index: int = 0) -> list[Bucket]:
    """Buckets in which receiver r gets `regions(meta)[r]` of each tensor (None: the whole tensor),
    numbered from `first_index`; `owner`: the source holding them all (None: every source adds its part).

    A bucket is cut when its largest chunk would pass `bucket_bytes`.
    """
    def pieces(meta: TensorMeta) -> list[TensorMeta]:
        out = []
        for region in regions(meta):
            shape = list(meta.shape)
            if region is not None:
                shape[region.dim] = region.length
            out.append(TensorMeta(meta.name, meta.dtype, tuple(shape), 0, region))
        if len(out) != num_receivers:
            raise ValueError(f"{meta.name}: {len(out)} regions for {num_receivers} receivers")
        return out

    per_tensor = [pieces(m) for m in tensors]
    groups = _cut(per_tensor, lambda ps: max(_aligned(p.nbytes) for p in ps), bucket_bytes)
    buckets = []
    for group in groups:
        layouts = [_layout([ps[r] for ps in group]) for r in range(num_receivers)]
        buckets.append(Bucket(first_index + len(buckets), tuple(l for l, _ in layouts), tuple(s for _, s in layouts),
                              owner))
    return buckets


def plan_owned_sliced(owned: dict[int, list[TensorMeta]], regions: Callable[[TensorMeta], list[Optional[Region]]],
                      num_receivers: int, bucket_bytes: int) -> list[Bucket]:
    """Sliced buckets, each holding tensors of one owner (source rank), owners in rank order."""
    plan: list[Bucket] = []
    for owner in sorted(owned):
        plan += plan_sliced(owned[owner], regions, num_receivers, bucket_bytes, owner=owner, first_index=len(plan))
    return plan


def pack(chunk: torch.Tensor, data_bytes: int, layout: tuple[TensorMeta, ...],
         tensors: dict[str, torch.Tensor]) -> None:
    """Write the tensors this source holds into `chunk`; every other data byte becomes zero, so that
    contributions of several sources can be summed exactly."""
    if any(m.name not in tensors for m in layout):
        chunk[:data_bytes].zero_()
    for meta in layout:
        source = tensors.get(meta.name)
        if source is None:
            continue
        target = meta.view(chunk)
        if meta.region is not None:
            source = meta.region.of(source)
        if tuple(source.shape) != meta.shape or dtype_name(source.dtype) != meta.dtype:
            raise ValueError(f"weight sync: {meta.name} is {dtype_name(source.dtype)}{tuple(source.shape)}, "
                             f"the plan says {meta.dtype}{meta.shape}")
        target.copy_(source)


def unpack(chunk: torch.Tensor, layout: tuple[TensorMeta, ...]) -> list[tuple[str, torch.Tensor]]:
    return [(m.name, m.view(chunk)) for m in layout]


_COLUMNS = 64  # int64 words per row of the checksum's (rows, columns) view


def checksum(data: torch.Tensor) -> int:
    """The position-weighted sum of the int64 words of `data` (uint8, length a multiple of 8), mod 2^64:
    sum over words p of (2p + 1) * x_p.

    Linear in the words, so the checksum of an integer sum of disjoint contributions is the sum of their
    checksums. The weights are odd, so any single flipped bit changes it, and they differ per position,
    so misplaced words change it. Computed on the tensor's own device without widening or weighting
    every word: with p = i * C + j in a (rows, C) view, sum p * x_p = C * sum_i i * rowsum_i +
    sum_j j * colsum_j, two plain reductions (about 10x faster than multiplying by a weight vector).
    """
    words = data.view(torch.int64)
    rows = words.numel() // _COLUMNS
    body, tail = words[:rows * _COLUMNS].view(rows, _COLUMNS), words[rows * _COLUMNS:]
    row_sums, col_sums = body.sum(dim=1), body.sum(dim=0)
    arange = lambda n, start=0: torch.arange(start, start + n, dtype=torch.int64, device=data.device)  # noqa: E731
    weighted = (_COLUMNS * (arange(rows) * row_sums).sum() + (arange(_COLUMNS) * col_sums).sum()
                + (arange(tail.numel(), rows * _COLUMNS) * tail).sum())
    total = 2 * weighted + row_sums.sum() + tail.sum()
    return int(total.item()) % (1 << 64)


def write_checksum(chunk: torch.Tensor, data_bytes: int, source: int, num_sources: int) -> None:
    """Put the checksum of this source's contribution in its trailer slot (other slots zero)."""
    slots = chunk[data_bytes:data_bytes + trailer_bytes(num_sources)].view(torch.int64)
    slots.zero_()
    value = checksum(chunk[:data_bytes])
    slots[source] = value - (1 << 64) if value >= 1 << 63 else value  # the same 64 bits, as a signed int64


def verify_chunk(chunk: torch.Tensor, data_bytes: int, num_sources: int) -> bool:
    slots = chunk[data_bytes:data_bytes + trailer_bytes(num_sources)].view(torch.int64)
    expected = int(slots.sum().item())
    return ((checksum(chunk[:data_bytes]) - expected) % (1 << 64)) == 0
