"""Rollout throughput with 1 and 2 SGLang engines behind the rollout manager, and the manager's own cost.

A local Ray cluster with two logical GPUs; each `RolloutEngine` is a Ray actor with one CPU (so Ray
gives its torch one thread) in a bundle of its own, on a randomly initialised Qwen2 (hidden 256, 4
layers). One batch: `--prompts` prompts x `--samples` samples, at most `--tokens` new tokens each, at
temperature 1. Three ways, alternating, `--repeats` times after a warm-up each:

- `direct`: `RolloutEngine.generate` on engine 0 (the reference: no manager);
- `manager, 1 engine`: `RolloutManager.generate` over engine 0 alone (the manager's overhead);
- `manager, 2 engines`: over both engines (whole groups per engine).

Engines are reseeded before every call, so each way samples the same tokens on a given engine.
Reports generated tokens per second (median) and the ratio to `direct`.

    .venv/bin/python benchmarks/rollout_scaling.py [--prompts 32 --samples 8 --tokens 64 --json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.util.placement_group import placement_group

    from rl.cluster import in_bundle
    from rl.demo.tiny_model import create_tiny_qwen2
    from rl.sample import Sample
    from rollout.config import RolloutConfig
    from rollout.manager import RolloutManager
    from rollout.sglang.engine import RolloutEngine

    model = create_tiny_qwen2(tempfile.mkdtemp(prefix="rollout-scaling-"), hidden_size=256, num_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, seed=0)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    pg = placement_group([{"CPU": 2, "GPU": 1}] * 2)
    ray.get(pg.ready(), timeout=60)
    config = RolloutConfig(max_total_tokens=args.prompts * args.samples * (args.tokens + 32))
    engines = [ray.remote(RolloutEngine).options(num_cpus=1, num_gpus=0.5, scheduling_strategy=in_bundle(pg, j))
               .remote(model, config, device="cpu", seed=j) for j in range(2)]
    ray.get([e.__ray_ready__.remote() for e in engines], timeout=300)
    one, two = RolloutManager(engines[:1], timeout_s=600), RolloutManager(engines, timeout_s=600)
    prompts = [[3 + (i * 7 + j) % 40 for j in range(6 + i % 5)] for i in range(args.prompts)]

    def batch() -> list[Sample]:
        return [Sample(group_id=g, prompt="", prompt_ids=p, reference="", temperature=1.0)
                for g, p in enumerate(prompts) for _ in range(args.samples)]

    caps = [args.tokens] * (args.prompts * args.samples)
    ways = {
        "direct": lambda: ray.get(engines[0].generate.remote(batch(), caps), timeout=600),
        "manager, 1 engine": lambda: one.generate(batch(), caps),
        "manager, 2 engines": lambda: two.generate(batch(), caps),
    }
    times: dict[str, list[float]] = {w: [] for w in ways}
    tokens: dict[str, int] = {}
    for i in range(args.repeats + 1):
        for way, run in ways.items():
            ray.get([e.reseed.remote(1234) for e in engines], timeout=60)
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
            tokens[way] = sum(len(s.response_ids) for s in out)
            if i:
                times[way].append(seconds)
    rows = []
    direct = tokens["direct"] / statistics.median(times["direct"])
    for way in ways:
        seconds = statistics.median(times[way])
        rows.append({"way": way, "tokens": tokens[way], "seconds": seconds, "tokens_per_s": tokens[way] / seconds,
                     "vs_direct": tokens[way] / seconds / direct, "repeats": times[way]})
    title = (f"rollout scaling: {args.prompts} prompts x {args.samples} samples x <= {args.tokens} tokens, "
             f"Qwen2 hidden 256 x 4 layers, SGLang on CPU, 1 thread per engine ({os.cpu_count()} cores), "
             f"median of {args.repeats}")
    print(title)
    print(f"{'way':<20} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'x direct':>9}")
    for r in rows:
        print(f"{r['way']:<20} {r['tokens']:>7} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.0f} {r['vs_direct']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "args": vars(args), "rows": rows}, f, indent=1)
    ray.get([e.shutdown.remote() for e in engines], timeout=60)
    ray.shutdown()


if __name__ == "__main__":
    main()
