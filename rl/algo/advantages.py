"""Advantages from rewards, per prompt group (no critic: Kimi, GRPO, DAPO and GSPO all baseline this way).

The Kimi baseline is the group's mean reward, the sample itself included (docs/kimi-methods.md §1.1); GRPO
also divides by the group's standard deviation. Groups whose rewards are all equal carry no signal
(every advantage is zero); dynamic sampling (DAPO) drops them and samples more prompts instead.
"""
from __future__ import annotations

import torch

from rl.sample import Sample, by_group

STD_EPS = 1e-4  # added to the std before dividing (TRL's GRPOTrainer uses the same)


def group_advantages(samples: list[Sample], normalize_std: bool = False) -> None:
    """Set each sample's advantage to its reward minus its group's mean reward, divided by the group's
    (unbiased) reward std plus STD_EPS when `normalize_std`."""
    for members in by_group(samples).values():
        rewards = torch.tensor([float(s.reward) for s in members], dtype=torch.float64)  # type: ignore[arg-type]
        centred = rewards - rewards.mean()
        if normalize_std:
            std = rewards.std() if len(members) > 1 else torch.zeros((), dtype=torch.float64)
            centred = centred / (std + STD_EPS)
        for s, a in zip(members, centred.tolist()):
            s.advantage = a


def uniform_groups(samples: list[Sample]) -> set[int]:
    """Ids of the groups whose samples all have the same reward (zero advantage everywhere)."""
    return {g for g, members in by_group(samples).items() if len({float(s.reward) for s in members}) == 1}  # type: ignore[arg-type]
