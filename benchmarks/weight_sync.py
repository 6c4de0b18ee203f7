"""Weight-sync throughput of the checkpoint engine's transports, against one raw broadcast.

It spawns `--world` processes (gloo on CPU) that form one `SyncGroup` on 127.0.0.1: rank 0 is the
source (the trainer holding the weights), ranks 1.. are receivers (rollout ranks). For each payload
the source holds a set of 2-D tensors totalling that many MiB, mixed fp32 and bf16 (pieces of up to
4 MiB, plus one 1.25-bucket fp32 tensor once the payload is at least two buckets), and every member
runs `TransferMember.push` for each transport:
- broadcast: `plan_full`, every receiver gets every tensor whole;
- reduce_scatter: `plan_sliced`, receiver r gets the r-th row slice of every tensor, so each
  receiver gets about 1/(world - 1) of the payload; every member feeds the full, zero-padded buffer
  into a ring reduce-scatter;
- shard: `plan_owned_sliced`, the same slices, sent point-to-point by the source to each receiver.
Per transport it also reports the bytes each member put on the wire (the transport's count: the
broadcast's root sends each bucket once, a ring reduce-scatter member (W-1)/W of the padded buffer,
the shard source every receiver's chunk) and the bytes each receiver took in, against payload / R.
Receivers deliver by copying each received tensor into their own preallocated copy of the weights
(`--deliver none` skips that), and after the warm-up push they check that copy against the source's
tensors. Each configuration is timed with `verify=False` and again with `verify=True` (checksums
computed by the source, checked by the receivers): one warm-up push, then the median of `--repeats`.
The references, in the same run and through the same gloo group (a warm-up, then the median of
`--repeats`): one raw `SyncGroup.broadcast` of a single uint8 tensor of the payload's size ("vs raw
bcast", the issue's yardstick for both transports), and one raw `SyncGroup.reduce_scatter` of int64
words in which each receiver gets 1/R of the payload, the reduce_scatter transport's own collective
bare ("vs raw own": for broadcast the same as "vs raw bcast").

Every timed call starts after a barrier, and its time is the slowest member's, so it ends when the
last receiver has its data. Effective GB/s is payload bytes (1 GB = 1e9 B) / seconds for every row,
including reduce_scatter where each receiver gets only its slice. Stage columns are the slowest
member's seconds in that stage (pack and checksum on the source, wait for the collective, checksum
check and delivery on the receivers), for the run without checksums.

    .venv/bin/python benchmarks/weight_sync.py                                   # 1 source + 1 receiver
    .venv/bin/python benchmarks/weight_sync.py --world 3 --sizes 1,16,64,256 --json /tmp/ws.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint_engine.buckets import Region, TensorMeta, plan_full, plan_owned_sliced, plan_sliced  # noqa: E402
from checkpoint_engine.group import SyncGroup  # noqa: E402
from checkpoint_engine.transfer import TransferMember  # noqa: E402

MiB = 1 << 20
COLS = 1024  # every tensor is (rows, COLS): fp32 rows are 4 KiB, bf16 rows 2 KiB
NUM_SOURCES = 1
STAGES = ("gather", "pack", "transfer", "load")
TRANSPORTS = ("broadcast", "reduce_scatter", "shard")  # the ones through a group ("colocated" has none)


def tensor_specs(payload: int, bucket_bytes: int) -> list[tuple[str, str, int]]:
    """(name, dtype, rows) of tensors totalling exactly `payload` bytes (a multiple of 4 KiB)."""
    specs, left = [], payload
    if payload >= 2 * bucket_bytes:  # one tensor larger than a bucket: it travels alone
        rows = (bucket_bytes + bucket_bytes // 4) // (4 * COLS)
        specs.append(("big.fp32", "float32", rows))
        left -= rows * 4 * COLS
    piece = max(64 * 1024, min(4 * MiB, payload // 8)) // (4 * COLS) * (4 * COLS)
    while left > 0:  # every size here is a multiple of 4 KiB, so of an fp32 and of a bf16 row
        fp32 = len(specs) % 2 == 0
        size = min(piece, left)
        specs.append((f"layer{len(specs)}.{'fp32' if fp32 else 'bf16'}", "float32" if fp32 else "bfloat16",
                      size // ((4 if fp32 else 2) * COLS)))
        left -= size
    return specs


def make_tensors(specs, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, dtype, rows) in enumerate(specs):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out[name] = torch.randn(rows, COLS, generator=g, dtype=getattr(torch, dtype))
    return out


def row_regions(num_receivers: int):
    def regions(meta: TensorMeta) -> list[Region]:
        rows = meta.shape[0]
        bounds = [r * rows // num_receivers for r in range(num_receivers + 1)]
        return [Region(0, bounds[r], bounds[r + 1] - bounds[r], rows) for r in range(num_receivers)]
    return regions


def _worker(rank, world, port, sizes, bucket_bytes, repeats, deliver_mode, out_dir):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    group = SyncGroup(rank, world, "127.0.0.1", port, "cpu", timeout_s=600.0)
    receiver = rank - NUM_SOURCES if rank >= NUM_SOURCES else None
    num_receivers = world - NUM_SOURCES
    barrier = lambda: group.all_reduce_max(0)  # noqa: E731

    def timed(collective, into: list) -> None:
        """A warm-up, then `repeats` timed calls, each after a barrier."""
        for i in range(repeats + 1):
            barrier()
            start = time.perf_counter()
            collective()
            if i:
                into.append(time.perf_counter() - start)
    results = []
    for index, payload in enumerate(sizes):
        specs = tensor_specs(payload, bucket_bytes)
        metas = [TensorMeta(name, dtype, (rows, COLS)) for name, dtype, rows in specs]
        # the source's weights; receivers make the same ones to check what they received
        weights = make_tensors(specs, seed=index + 1)
        entry = {"payload_bytes": payload, "tensors": len(specs), "raw": [], "transports": {}}

        raw = torch.zeros(payload, dtype=torch.uint8)
        if rank == 0:
            raw.random_(0, 256, generator=torch.Generator().manual_seed(index))
        options = dist.BroadcastOptions()  # the bare collective, waited for plainly (no heartbeat polling)
        timed(lambda: group.pg.broadcast([raw], options).wait(), entry["raw"])
        del raw
        # the same collective as the reduce_scatter transport, bare: each receiver gets 1/R of the bytes
        words = payload // 8 // num_receivers
        empty = torch.zeros(0, dtype=torch.int64)
        inputs = [empty] * NUM_SOURCES + [torch.ones(words, dtype=torch.int64) for _ in range(num_receivers)]
        output = torch.zeros(words, dtype=torch.int64) if receiver is not None else empty
        entry["raw_reduce_scatter"] = []
        timed(lambda: group.reduce_scatter(output, inputs), entry["raw_reduce_scatter"])
        del inputs, output

        for mode in TRANSPORTS:
            if mode == "broadcast":
                plan = plan_full({0: metas}, bucket_bytes)
                regions = {m.name: None for m in metas}
            else:
                split = row_regions(num_receivers)
                plan = (plan_sliced(metas, split, num_receivers, bucket_bytes) if mode == "reduce_scatter"
                        else plan_owned_sliced({0: metas}, split, num_receivers, bucket_bytes))
                regions = {m.name: split(m)[receiver] if receiver is not None else None for m in metas}
            # a receiver's engine weights (its slice of each tensor), written by `deliver`
            dest = {}
            if receiver is not None:
                dest = {n: torch.zeros_like(t if regions[n] is None else regions[n].of(t)) for n, t in weights.items()}

            def produce(bucket):
                return {name: weights[name] for name in bucket.names()}

            def deliver(bucket, layout, chunk, ok):
                for meta in layout if ok else ():
                    dest[meta.name].copy_(meta.view(chunk))

            runs = {}
            for verify in (False, True):
                member = TransferMember(group, plan, mode, NUM_SOURCES, verify=verify)
                pushes = []
                for i in range(repeats + 1):
                    barrier()
                    result = member.push(i, produce=produce if receiver is None else None,
                                         deliver=deliver if receiver is not None and deliver_mode == "copy" else None)
                    if i:
                        pushes.append(result)
                    elif not verify and receiver is not None and deliver_mode == "copy":
                        for name, t in weights.items():
                            expected = t if regions[name] is None else regions[name].of(t)
                            if not torch.equal(dest[name], expected):
                                raise RuntimeError(f"{mode} {payload // MiB} MiB: receiver {receiver} got wrong {name}")
                runs["verify" if verify else "plain"] = pushes
                entry["buffer_bytes"] = entry.get("buffer_bytes", {}) | {mode: member.buffer_bytes}
                del member
            entry["transports"][mode] = {"buckets": len(plan), "runs": runs}
            del dest
        del weights
        results.append(entry)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)
    barrier()
    group.close()


def aggregate(per_rank: list[list[dict]], repeats: int) -> list[dict]:
    """Per repeat the slowest member's time (per stage: the slowest member's time in that stage);
    then the median over repeats."""
    rows = []
    for entries in zip(*per_rank):
        payload = entries[0]["payload_bytes"]
        raw = statistics.median(max(e["raw"][i] for e in entries) for i in range(repeats))
        raw_rs = statistics.median(max(e["raw_reduce_scatter"][i] for e in entries) for i in range(repeats))
        own_raw = {"broadcast": raw, "reduce_scatter": raw_rs, "shard": raw}  # shard: against the broadcast
        out = {"payload_mib": payload / MiB, "payload_bytes": payload, "tensors": entries[0]["tensors"],
               "raw_broadcast": {"seconds": raw, "gbps": payload / raw / 1e9,
                                 "repeats": [max(e["raw"][i] for e in entries) for i in range(repeats)]},
               "raw_reduce_scatter": {"seconds": raw_rs, "gbps": payload / raw_rs / 1e9},
               "transports": {}}
        for mode in entries[0]["transports"]:
            modes = [e["transports"][mode] for e in entries]
            t = {"buckets": modes[0]["buckets"], "buffer_bytes_per_member": [e["buffer_bytes"][mode] for e in entries]}
            for run in ("plain", "verify"):
                pushes = [m["runs"][run] for m in modes]
                slowest = [max(p[i]["seconds"] for p in pushes) for i in range(repeats)]
                seconds = statistics.median(slowest)
                stages = {s: statistics.median(max(p[i].get(f"{s}_seconds", 0.0) for p in pushes)
                                               for i in range(repeats)) for s in STAGES}
                t[run] = {"seconds": seconds, "gbps": payload / seconds / 1e9, "vs_raw": raw / seconds,
                          "vs_own_collective": own_raw[mode] / seconds,
                          "repeats": slowest, "stage_seconds": stages,
                          "bytes_received_per_receiver": [p[0]["bytes_received"] for p in pushes[NUM_SOURCES:]],
                          "bytes_sent_per_member": [p[0].get("bytes_sent", 0) for p in pushes]}
            out["transports"][mode] = t
        rows.append(out)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    header = ["MiB", "transport", "buckets", "s", "GB/s", "vs raw bcast", "vs raw own", "s (checksums)",
              "pack s", "transfer s", "load s", "sent MiB (max)", "recv MiB", "recv / (payload/R)"]
    lines = []
    for row in rows:
        raw, raw_rs = row["raw_broadcast"], row["raw_reduce_scatter"]
        lines.append([f"{row['payload_mib']:g}", "raw broadcast", "1", f"{raw['seconds']:.4f}", f"{raw['gbps']:.2f}",
                      "1.00", "1.00", "", "", "", "", "", "", ""])
        lines.append(["", "raw reduce_scatter", "1", f"{raw_rs['seconds']:.4f}", f"{raw_rs['gbps']:.2f}",
                      f"{raw['seconds'] / raw_rs['seconds']:.2f}", "1.00", "", "", "", "", "", "", ""])
        for mode, t in row["transports"].items():
            plain, checked = t["plain"], t["verify"]
            receivers = len(plain["bytes_received_per_receiver"])
            recv = max(plain["bytes_received_per_receiver"])
            st = plain["stage_seconds"]
            lines.append(["", mode, str(t["buckets"]), f"{plain['seconds']:.4f}", f"{plain['gbps']:.2f}",
                          f"{plain['vs_raw']:.2f}", f"{plain['vs_own_collective']:.2f}", f"{checked['seconds']:.4f}",
                          f"{st['pack']:.4f}", f"{st['transfer']:.4f}", f"{st['load']:.4f}",
                          f"{max(plain['bytes_sent_per_member']) / MiB:.1f}", f"{recv / MiB:.1f}",
                          f"{recv / (row['payload_bytes'] / receivers):.3f}"])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        print(title)
        print(fmt(header))
        for l in lines:
            print(fmt(l))
        return
    print(title)
    table = Table()
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right")
    for i, l in enumerate(lines):
        table.add_row(*l, end_section=i + 1 < len(lines) and lines[i + 1][0] != "")
    Console(width=max(140, Console().width)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes: 1 source + (world - 1) receivers")
    parser.add_argument("--sizes", default="1,4,16,64,256,512", help="payloads in MiB, comma-separated")
    parser.add_argument("--bucket-mib", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deliver", choices=("copy", "none"), default="copy",
                        help="receivers copy each received tensor into their weights, or do nothing")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.world < 2:
        parser.error("--world must be at least 2 (one source and one receiver)")
    sizes = [int(float(s) * MiB) // (4 * COLS) * (4 * COLS) for s in args.sizes.split(",")]
    bucket_bytes = int(args.bucket_mib * MiB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world, port, sizes, bucket_bytes, args.repeats, args.deliver, out_dir),
                           nprocs=args.world, join=True, start_method="spawn")
        per_rank = []
        for r in range(args.world):
            with open(os.path.join(out_dir, f"{r}.json")) as f:
                per_rank.append(json.load(f))
    total = time.perf_counter() - started
    rows = aggregate(per_rank, args.repeats)
    title = (f"weight sync, {NUM_SOURCES} source + {args.world - NUM_SOURCES} receiver(s), gloo on CPU "
             f"({os.cpu_count()} cores), bucket {args.bucket_mib:g} MiB, deliver={args.deliver}, "
             f"median of {args.repeats} after 1 warm-up")
    print_table(rows, title)
    print(f"total {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": args.world, "num_sources": NUM_SOURCES, "bucket_bytes": bucket_bytes,
                       "repeats": args.repeats, "deliver": args.deliver, "cpu_count": os.cpu_count(),
                       "torch": torch.__version__, "total_seconds": total, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
