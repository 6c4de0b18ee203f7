"""A run's curves as PNG files, from its metrics.jsonl: held-out and training accuracy, reward, response
length, the train-inference logprob mismatch, and step time by phase.

    python -m rl.plot RUN_DIR [--out DIR]      # writes DIR/<name>.png (default: RUN_DIR/plots)

Runs that resumed log a step more than once; the last record of a step wins.
"""
from __future__ import annotations

import argparse
import json
import os

# (file name, title, y label, [(metrics.jsonl key or prefix*, legend label)])
PLOTS = [
    ("accuracy", "Accuracy", "accuracy", [("eval_accuracy", "held-out (eval)"), ("eval/*", "held-out: "),
                                          ("accuracy", "training batch")]),
    ("reward", "Reward", "mean reward", [("reward_mean", "reward (after shaping)")]),
    ("response_length", "Response length", "tokens", [("response_length", "mean response length")]),
    ("mismatch", "Train-inference mismatch", "max |logprob difference|", [("logprob_mismatch_max", "max over tokens")]),
    ("step_time", "Step time by phase", "seconds", [("rollout_seconds", "rollout"), ("reward_seconds", "reward"),
                                                    ("train_seconds", "train"), ("sync_seconds", "sync")]),
]


def read_metrics(run_dir: str) -> dict[int, dict]:
    """The last record of each step in RUN_DIR/metrics.jsonl."""
    records: dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                records[int(row["step"])] = {**records.get(int(row["step"]), {}), **row}
    return records


def series(records: dict[int, dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Each matching key's (steps, values); `key` ending in * matches every key with that prefix."""
    keys = sorted({k for r in records.values() for k in r if k.startswith(key[:-1])}) if key.endswith("*") else [key]
    out = {}
    for k in keys:
        steps = [s for s in sorted(records) if isinstance(records[s].get(k), (int, float))]
        if steps:
            out[k] = (steps, [float(records[s][k]) for s in steps])
    return out


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write one PNG per plot that has data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, title, ylabel, curves in PLOTS:
        lines = [(label + (k.split("/")[1] if key.endswith("*") else ""), data)
                 for key, label in curves for k, data in series(records, key).items()]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, (steps, values) in lines:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set(title=f"{title} — {os.path.basename(os.path.normpath(run_dir))}", xlabel="step", ylabel=ylabel)
        if name == "mismatch":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args()
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
