"""Does PARL learn, and what do its auxiliary rewards change? The `swarm_wide_search` preset over seeds,
as is and with each PARL term switched off (same seeds):

    python benchmarks/parl_learning.py [--seeds 0 1] [--variants parl,no_parallel,no_finish] [--steps N]
    python benchmarks/parl_learning.py --report-only        # the tables again from the runs on disk

Each run is `python -m rl.train --config-name swarm_wide_search` in a process of its own; its held-out
evaluation (before training and every `eval.every` steps) is what the tables show, mean and range over
the seeds: item F1, sub-agents per episode and per stage, critical steps (all episodes, and solved
ones), wall-clock per episode. Runs already complete in --out are reused, so an interrupted sweep
continues. Writes <out>/parl_learning.md and <out>/parl_learning.png.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rl.plot import read_metrics  # noqa: E402

VARIANTS = {
    "parl": [],  # r_perf + lambda1 r_parallel + lambda2 r_finish
    "no_parallel": ["agent.swarm.lambda_parallel=0"],  # lambda1 = 0
    "no_finish": ["agent.swarm.lambda_finish=0"],  # lambda2 = 0
}
# (metrics.jsonl key, row label)
ROWS = [("eval_accuracy", "held-out item F1"), ("eval_solved", "solved (all items right)"),
        ("eval_subagents", "sub-agents per episode"), ("eval_subagents_per_stage", "sub-agents per stage"),
        ("eval_subagents_per_assigning_stage", "sub-agents per assigning stage (1: serial)"),
        ("eval_critical_steps", "critical steps"), ("eval_critical_steps_solved", "critical steps per solved task"),
        ("eval_answered", "answered within the budget"), ("eval_episode_seconds", "seconds per episode")]


def run(out: str, variant: str, seed: int, steps: int | None) -> str:
    """One run (skipped when its directory holds a finished one); returns its directory."""
    run_dir = os.path.join(out, f"{variant}-seed{seed}")
    if os.path.isfile(os.path.join(run_dir, "done")):
        return run_dir
    overrides = [f"seed={seed}", f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "checkpoint.every=0",
                 *VARIANTS[variant], *([f"steps={steps}"] if steps else [])]
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
    start = time.time()
    subprocess.run([sys.executable, "-m", "rl.train", "--config-name", "swarm_wide_search", *overrides], check=True)
    with open(os.path.join(run_dir, "done"), "w") as f:
        f.write(f"{time.time() - start:.0f}\n")
    return run_dir


def summary(runs: dict[str, list[str]]) -> str:
    """Per variant, a table: each row's mean (min–max) over the seeds at each evaluated step."""
    parts = []
    for variant, dirs in runs.items():
        records = [read_metrics(d) for d in dirs]
        steps = sorted(set.intersection(*({s for s, r in rec.items() if "eval_accuracy" in r} for rec in records)))
        minutes = [float(open(os.path.join(d, "done")).read()) / 60 for d in dirs]
        parts.append(f"### {variant} ({', '.join(VARIANTS[variant]) or 'as in the preset'}; {len(dirs)} seeds, "
                     f"{min(minutes):.1f}–{max(minutes):.1f} min a run)\n")
        parts.append("| step | " + " | ".join(str(s) for s in steps) + " |")
        parts.append("|---" * (len(steps) + 1) + "|")
        for key, label in ROWS:
            cells = []
            for s in steps:
                values = [rec[s][key] for rec in records if key in rec[s]]
                cells.append(_cell(values))
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}–{max(values):.2f})"


def plot(runs: dict[str, list[str]], path: str) -> None:
    """Held-out item F1, stage width and critical steps against the step: each variant's mean, its range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("eval_accuracy", "eval_subagents_per_assigning_stage", "eval_critical_steps"),
                              ("held-out item F1", "sub-agents per assigning stage", "critical steps per episode")):
        for variant, dirs in runs.items():
            records = [read_metrics(d) for d in dirs]
            steps = sorted(set.intersection(*({s for s, r in rec.items() if key in r} for rec in records)))
            values = [[rec[s][key] for rec in records] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], label=variant)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--out", default="outputs/parl_learning")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs: dict[str, list[str]] = {}
    for variant in args.variants.split(","):
        for seed in args.seeds:
            run_dir = os.path.join(args.out, f"{variant}-seed{seed}")
            if not args.report_only:
                run(args.out, variant, seed, args.steps)
            if os.path.isfile(os.path.join(run_dir, "done")):
                runs.setdefault(variant, []).append(run_dir)
    table = summary(runs)
    print(table)
    with open(os.path.join(args.out, "parl_learning.md"), "w") as f:
        f.write(table)
    plot(runs, os.path.join(args.out, "parl_learning.png"))


if __name__ == "__main__":
    main()
