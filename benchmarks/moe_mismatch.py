"""Train-inference mismatch on the MoE demo (conf/moe_demo.yaml: bf16 SGLang, fp32 Megatron) with and
without routing replay and with each correction: a few RL steps per variant and seed, the per-step
mismatch measures (rl/algo/mismatch.py) averaged over the steps, as a markdown table (mean and range over
seeds). Each variant is a real `rl.train` run in its own process.

    .venv/bin/python benchmarks/moe_mismatch.py [--steps 20] [--seeds 0,1] [--arch qwen3_moe] [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> overrides of conf/moe_demo.yaml (whose default is R3); the bands are the sources' (docs/mismatch.md)
VARIANTS = {
    "no replay": ["algorithm.routing_replay=off"],
    "R3 (rollout routing)": ["algorithm.routing_replay=rollout"],
    "R2 (pi_old routing; 2 updates)": ["algorithm.routing_replay=trainer", "algorithm.updates_per_step=2"],
    "no replay; 2 updates": ["algorithm.routing_replay=off", "algorithm.updates_per_step=2"],
    "no replay + TIS (cap 2)": ["algorithm.routing_replay=off", "algorithm.tis_cap=2.0"],
    "no replay + token mask [0.5, 5]": ["algorithm.routing_replay=off", "algorithm.token_mask_low=0.5",
                                        "algorithm.token_mask_high=5.0"],
    "no replay + sequence reject [0.98, 1.02]": ["algorithm.routing_replay=off", "algorithm.sequence_reject_low=0.98",
                                                 "algorithm.sequence_reject_high=1.02"],
}
COLUMNS = ("logprob_mismatch_mean", "logprob_mismatch_max", "mismatch_k3_kl", "routing_diff_share",
           "tis_weight_mean", "tis_truncated_share", "mismatch_masked_share", "mismatch_dropped_sample_share")


def run(arch: str, overrides: list[str], steps: int, seed: int, run_dir: str) -> list[dict]:
    cmd = [sys.executable, "-m", "rl.train", "--config-name", "moe_demo", f"steps={steps}", f"seed={seed}",
           f"model.architecture={arch}", f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "eval.every=0",
           *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "logprob_mismatch_mean" in row]


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{min(values):.3g}, {max(values):.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "deepseek_v3"))
    parser.add_argument("--variants", default="|".join(VARIANTS), help="names of VARIANTS, separated by |")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.arch}, {args.steps} steps, seeds {seeds}: per-step measures averaged over the steps "
          f"(max: the largest step's), mean [range] over seeds\n")
    print("| variant | " + " | ".join(COLUMNS) + " | accuracy (last 5 steps) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name in args.variants.split("|"):
        per_seed: dict[str, list[float]] = {c: [] for c in (*COLUMNS, "accuracy")}
        for seed in seeds:
            with tempfile.TemporaryDirectory() as run_dir:
                rows = run(args.arch, VARIANTS[name], args.steps, seed, run_dir)
            for c in COLUMNS:
                values = [r.get(c, float("nan")) for r in rows]
                per_seed[c].append(max(values) if c == "logprob_mismatch_max" else statistics.fmean(values))
            per_seed["accuracy"].append(statistics.fmean(r["accuracy"] for r in rows[-5:]))
        print(f"| {name} | " + " | ".join(cell(per_seed[c]) for c in (*COLUMNS, "accuracy")) + " |", flush=True)


if __name__ == "__main__":
    main()
