"""Prompt sets at real scale: load time, resident memory and time per draw of a `Family` over generated
JSONL sets of 100k and 1M rows (chat-message prompts), against the way draws were made before (every
row copied into a Python dict, and a list of every row index shuffled for each draw) measured in the
same run on the same rows.

    .venv/bin/python benchmarks/prompt_sets.py [--rows 100000,1000000] [--draws 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def write_rows(path: str, count: int) -> None:
    from rl.data.word_problems import generate

    with open(path, "w") as f:
        for start in range(0, count, 50_000):
            f.writelines(json.dumps(r) + "\n" for r in generate(min(50_000, count - start), seed=start))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--old-draws", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import datasets

    from rl.data.config import TaskConfig, TaskFamilyConfig
    from rl.data.prompt_files import load_records
    from rl.data.prompts import Family

    print(f"{'rows':>9} {'load s':>7} {'RSS +MB':>8} {'first draw ms':>14} {'per draw us':>12} "
          f"{'old: load s':>11} {'old: RSS +MB':>12} {'old: per draw ms':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        datasets.config.HF_DATASETS_CACHE = tmp  # a fresh Arrow cache: load times include the conversion
        for count in (int(r) for r in args.rows.split(",")):
            path = os.path.join(tmp, f"rows{count}.jsonl")
            write_rows(path, count)
            config = TaskFamilyConfig(path=path, prompt_field="messages")
            before, start = rss_mb(), time.perf_counter()
            family = Family("set", config, TaskConfig(), seed=0)
            load, grown = time.perf_counter() - start, rss_mb() - before
            start = time.perf_counter()
            family.problem(0)  # the epoch's permutation is made here, once
            first = time.perf_counter() - start
            times = []
            for k in range(1, args.draws + 1):
                start = time.perf_counter()
                family.problem(k)
                times.append(time.perf_counter() - start)
            per_draw = statistics.median(times)
            # the previous way: rows as Python dicts, and a full shuffle of the row indices per draw
            before, start = rss_mb(), time.perf_counter()
            rows = load_records(path, Family.fields(config), "set")
            old_load, old_grown = time.perf_counter() - start, rss_mb() - before
            old = []
            for k in range(args.old_draws):
                start = time.perf_counter()
                order = list(range(len(rows)))
                random.Random(f"0/set/{k // len(rows)}").shuffle(order)
                _ = rows[order[k % len(rows)]]
                old.append(time.perf_counter() - start)
            print(f"{count:>9,} {load:>7.1f} {grown:>8.0f} {first * 1e3:>14.1f} {per_draw * 1e6:>12.1f} "
                  f"{old_load:>11.1f} {old_grown:>12.0f} {statistics.median(old) * 1e3:>16.0f}")
            del rows, family


if __name__ == "__main__":
    main()
