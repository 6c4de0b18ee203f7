"""Processes of a sync group for tests/integration/test_weight_sync.py (a light module: spawned children import it)."""
import os
import time

import torch

from checkpoint_engine.buckets import Region, TensorMeta, dtype_name, plan_full, plan_owned_sliced, plan_sliced, unpack

BUCKET = 16 * 1024  # bytes: the "big" tensors below (32 KiB) do not fit in one


def source_tensors(source: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes, odd sizes, and tensors larger than one bucket."""
    g = torch.Generator().manual_seed(100 + source)
    return {
        f"s{source}.fp32": torch.randn(30, 7, generator=g),
        f"s{source}.bf16": torch.randn(4, 250, generator=g).to(torch.bfloat16),
        f"s{source}.fp16": torch.randn(10, 3, generator=g).to(torch.float16),
        f"s{source}.int8": torch.randint(-100, 100, (4, 37), dtype=torch.int8, generator=g),
        f"s{source}.big": torch.randn(64, 128, generator=g),
        f"s{source}.fp8": torch.randn(2, 64, generator=g).to(torch.float8_e4m3fn),
    }


def _metas(tensors):
    return [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def make_plan(mode: str, sources: int, receivers: int):
    owned = {s: _metas(source_tensors(s)) for s in range(sources)}
    if mode == "broadcast":
        return plan_full(owned, BUCKET)

    def rows(meta):  # receiver r gets a row range of every tensor with enough rows
        if meta.shape[0] % receivers:
            return [None] * receivers
        n = meta.shape[0] // receivers
        return [Region(0, r * n, n, meta.shape[0]) for r in range(receivers)]
    if mode == "shard":
        return plan_owned_sliced(owned, rows, receivers, BUCKET)
    return plan_sliced([m for s in range(sources) for m in owned[s]], rows, receivers, BUCKET)


def member(rank, world, sources, mode, port, results, die_at_bucket=None, timeout=10.0, corrupt_at_bucket=None):
    """One process of the sync group. Receivers record what they were delivered. With
    `corrupt_at_bucket`, sources flip a bit of that bucket after writing its checksum."""
    from checkpoint_engine.group import SyncGroup
    from checkpoint_engine.transfer import TransferMember

    names = [f"source {r}" for r in range(sources)] + [f"receiver {r}" for r in range(world - sources)]
    try:
        group = SyncGroup(rank, world, "127.0.0.1", port, "cpu", timeout, names)
        plan = make_plan(mode, sources, world - sources)
        mine = source_tensors(rank) if rank < sources else {}
        got = {}

        def deliver(bucket, layout, chunk, ok):
            if bucket.index == die_at_bucket:
                os._exit(17)  # a receiver crashing mid-push
            if not ok:
                return
            for name, view in unpack(chunk, layout):  # plain bytes: tensors through a Queue would be shared
                got[name] = (dtype_name(view.dtype), tuple(view.shape), _bits(view).numpy().tobytes())

        start = time.monotonic()
        try:
            transfer = TransferMember(group, plan, mode, sources)
            if corrupt_at_bucket is not None and rank < sources:
                fill = transfer._fill

                def corrupting_fill(bucket, slot, tensors):
                    fill(bucket, slot, tensors)
                    if bucket.index == corrupt_at_bucket:  # a bit flipped in transit
                        (transfer.slots if mode == "broadcast" else transfer.send_slots)[slot][0] ^= 1
                transfer._fill = corrupting_fill
            stats = transfer.push(1, produce=lambda b: mine, deliver=deliver)
            results.put((rank, "ok", got, stats))
        except Exception as exc:
            results.put((rank, "error", f"{type(exc).__name__}: {exc}", time.monotonic() - start))
        group.close()
    except Exception as exc:  # noqa: BLE001 - report, the parent asserts
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", 0.0))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)
