"""Reward throughput and latency: the code sandbox's programs per second, and per-call reward latency
percentiles through the runner.

Sandbox: the same small Python program (read two numbers, print their sum) run N times, `--parallel`
at once, through `Sandbox.run_python` (namespaces, limits, fresh directory, privilege drop) and, as the
reference measured in the same run, through a bare `subprocess.run([python, -I, -c, program])` with no
isolation. The ratio is what isolation costs.

Rewards: `RewardRunner.score` over a batch of samples for each built-in reward (and a sync and an
async no-op as the runner's own overhead); each call's latency is timed inside the runner's thread or
event loop, and the table gives p50 / p95 / p99 and calls per second.

    python benchmarks/rewards.py [--programs 64] [--parallel 2] [--samples 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import reward  # noqa: E402
from rewards.runner import RewardRunner, RewardSpec  # noqa: E402
from rewards.sandbox import SYSTEM_PYTHON, Limits, Sandbox  # noqa: E402
from rl.sample import Sample  # noqa: E402

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
LATENCIES: dict[str, list[float]] = {}


def timed(name: str, fn):
    """Wrap a reward so each call's latency lands in LATENCIES[name]."""
    def call(sample, **kwargs):
        start = time.perf_counter()
        try:
            return fn(sample, **kwargs)
        finally:
            LATENCIES.setdefault(name, []).append(time.perf_counter() - start)
    return call


@reward("bench_noop")
def noop(sample):
    return 1.0


@reward("bench_async_noop")
async def async_noop(sample):
    start = time.perf_counter()
    LATENCIES.setdefault("async no-op", []).append(time.perf_counter() - start)
    return 1.0


def sandbox_rate(n: int, parallel: int, run) -> float:
    """Programs per second; every run must print the right sum."""
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        outputs = list(pool.map(lambda i: run(f"{i} {i}"), range(n)))
    seconds = time.perf_counter() - start
    assert all(out.strip() == str(2 * i) for i, out in enumerate(outputs)), outputs[:3]
    return n / seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    box = Sandbox(Limits(wall_s=10, cpu_s=5))
    sandboxed = sandbox_rate(args.programs, args.parallel, lambda stdin: box.run_python(PROGRAM, stdin=stdin).stdout)
    bare = sandbox_rate(args.programs, args.parallel, lambda stdin: subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PROGRAM], input=stdin, capture_output=True, text=True).stdout)
    print(f"\nSandbox ({box.mode} mode, {os.cpu_count()} cores, {args.parallel} at once, {args.programs} programs)")
    print("| runner | programs/s | × bare subprocess |\n|---|---|---|")
    print(f"| bare `subprocess.run` (reference) | {bare:.1f} | 1.00 |")
    print(f"| `Sandbox.run_python` | {sandboxed:.1f} | {sandboxed / bare:.2f} |")

    import rewards.builtin.code
    import rewards.builtin.instructions
    import rewards.builtin.verifiable

    cases = {  # name -> (reward function, samples' response, reference, metadata)
        "no-op (sync)": (noop, "4", "4", {}),
        "exact_match": (rewards.builtin.verifiable.exact_match_reward, "4", "4", {}),
        "math_verify": (rewards.builtin.verifiable.math_verify_reward, "so $\\boxed{\\frac{1}{2}}$", "0.5", {}),
        "instruction_following": (rewards.builtin.instructions.instruction_following, '{"a": 1}', "",
                                  {"instructions": [{"type": "json"}, {"type": "max_words", "n": 5}]}),
        "code_tests (sandbox)": (rewards.builtin.code.code_tests, f"```python\n{PROGRAM}```", "",
                                 {"tests": [{"input": "2 3", "output": "5"}]}),
    }
    rows = []
    for name, (fn, response, reference, metadata) in [*cases.items(), ("async no-op", (None, "4", "4", {}))]:
        count = args.samples if "sandbox" not in name else min(args.samples, args.programs)
        samples = [Sample(group_id=i, prompt="", prompt_ids=[1], reference=reference, response=response,
                          metadata=metadata) for i in range(count)]
        spec = RewardSpec(f"bench {name}")
        if fn is not None:
            reward(spec.name)(timed(name, fn))
        else:
            spec.name = "bench_async_noop"
        runner = RewardRunner({"default": [spec]}, timeout_s=60, concurrency=8)
        runner.score(samples[:1])  # warm-up: lazy imports, the sandbox's one-time network check
        LATENCIES.pop(name, None)
        start = time.perf_counter()
        metrics = runner.score(samples)
        seconds = time.perf_counter() - start
        runner.close()
        assert metrics["reward_failures"] == 0, (name, samples[0].reward_failures)
        lat = LATENCIES[name]
        rows.append({"reward": name, "calls": count, "calls_per_s": count / seconds,
                     "p50_ms": 1e3 * percentile(lat, 0.5), "p95_ms": 1e3 * percentile(lat, 0.95),
                     "p99_ms": 1e3 * percentile(lat, 0.99), "mean_ms": 1e3 * statistics.mean(lat)})
    print("\nReward latency through RewardRunner (concurrency 8; latency of the function itself)")
    print("| reward | calls | calls/s | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reward']} | {r['calls']} | {r['calls_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['p99_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sandbox": {"mode": box.mode, "programs_per_s": sandboxed, "bare_per_s": bare,
                                   "parallel": args.parallel}, "rewards": rows}, f, indent=1)


if __name__ == "__main__":
    main()
