"""Per-step metrics to the console (with a progress bar), `metrics.jsonl` in the run directory, and wandb."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class MetricsLogger:
    # metric -> short console label (every metric goes to metrics.jsonl and wandb in full)
    CONSOLE_KEYS = {"accuracy": "acc", "eval_accuracy": "eval_acc", "response_length": "len", "loss": "loss",
                    "logprob_mismatch_max": "mismatch", "subagents_per_stage": "sub/stage",
                    "weight_version": "v", "step_seconds": "s"}

    def __init__(self, run_dir: str, config: Any, total_steps: int, wandb_mode: str, wandb_project: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=self.console)
        self.task = self.progress.add_task("", total=total_steps)
        self.progress.start()
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=run_dir, mode=wandb_mode,
                                    config=dataclasses.asdict(config))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = " ".join(f"{label}={metrics[k]:.3g}" for k, label in self.CONSOLE_KEYS.items() if k in metrics)
        self.progress.console.print(f"step {step:>4}  {shown}")
        if step > 0:
            self.progress.update(self.task, advance=1, description=f"acc {metrics.get('accuracy', 0):.2f}")

    def resumed_at(self, step: int) -> None:
        """A resumed run starts its progress bar at the checkpoint's step, and the records of the steps
        after it (logged before the run stopped) are removed: those steps are run again and logged
        once, so metrics.jsonl holds every step exactly once."""
        self.file.close()
        rewind_jsonl(self.path, lambda record: record["step"] <= step)
        self.file = open(self.path, "a")
        self.progress.update(self.task, completed=step)

    def close(self) -> None:
        self.progress.stop()
        self.file.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # stop wandb's service now, not in an atexit hook racing other shutdowns


def rewind_jsonl(path: str, keep) -> None:
    """Rewrite the JSON-lines file `path` with only the records `keep(record)` accepts (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and keep(json.loads(line))]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


@contextmanager
def marked_timer(name: str, timing: dict[str, float]):
    """Add the seconds the block takes to `timing[name]` (how the loop names its phases' times)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - start


MISMATCH_KEYS = ("logprob_mismatch_max", "logprob_mismatch_mean", "mismatch_k3_kl", "tis_weight_mean",
                 "tis_truncated_share", "mismatch_masked_share", "mismatch_dropped_sample_share", "routing_diff_share")


def step_metrics(samples: list, train: dict[str, float], correct_threshold: float) -> dict[str, float]:
    """What every step logs about its samples and its update."""
    n = len(samples)
    metrics = {
        "accuracy": sum(float(s.task_reward) >= correct_threshold for s in samples) / n,
        "reward_mean": sum(float(s.reward) for s in samples) / n,
        "truncated": sum(s.finish_reason == "length" for s in samples) / n,
        "response_length": sum(len(s.response_ids) for s in samples) / n,
        "loss": train["loss"],
        "grad_norm": train["grad_norm"],
        "lr": train["lr"],
    }
    # the mismatch measures (rl/algo/mismatch.py; routing_diff_share with MoE routing), PTX's, QK-Clip's
    for key, value in train.items():
        if key in MISMATCH_KEYS or key in ("ptx_loss", "max_attn_logit"):
            metrics[key] = value
    return metrics
