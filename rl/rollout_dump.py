"""Rollout dump and replay: each step's trained samples kept on disk, and steps trained again from them.

A dump is one gzip-compressed JSON-lines file per step, `step_<n>.jsonl.gz` (n as in metrics.jsonl),
one `Sample` a line as the trainers got it (no agent trace): prompt and response token ids, rollout
logprobs, loss mask, rewards, advantage and weight versions. It is written as soon as the step's
samples are collected, so a step that then fails to train is kept too. Replaying it with the trainer
restored from the checkpoint before it repeats its update: the same loss and gradient norm.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re

import numpy as np

from rl.sample import Sample

STEP_FILE = re.compile(r"^step_(\d+)\.jsonl\.gz$")


def step_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:06d}.jsonl.gz")


def dumped_steps(directory: str) -> list[int]:
    """The steps dumped in `directory`, in order."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(m.group(1)) for m in map(STEP_FILE.match, names) if m)


def write_step(directory: str, step: int, samples: list[Sample]) -> str:
    """Write the step's samples (their agent trace left out) atomically; returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = step_path(directory, step)
    with gzip.open(path + ".tmp", "wt") as f:
        for s in samples:
            row = dataclasses.asdict(dataclasses.replace(s, agent=None, routed_experts=None))
            if s.routed_experts is not None:  # MoE routing: [positions, layers, topk] as nested lists
                row["routed_experts"] = np.asarray(s.routed_experts).tolist()
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def read_step(directory: str, step: int) -> list[Sample]:
    """The samples dumped for `step`; the error names the setting and the steps that are there."""
    path = step_path(directory, step)
    if not os.path.isfile(path):
        steps = dumped_steps(directory)
        there = f"steps {steps[0]}..{steps[-1]}" if steps else "no steps"
        raise FileNotFoundError(f"rollout.replay_dir: {path} is missing ({directory} holds {there}); resume from "
                                f"the checkpoint before the first step to replay (checkpoint.resume)")
    with gzip.open(path, "rt") as f:
        samples = [Sample(**json.loads(line)) for line in f if line.strip()]
    for s in samples:
        if s.routed_experts is not None:
            s.routed_experts = np.asarray(s.routed_experts, dtype=np.int16)
    return samples
