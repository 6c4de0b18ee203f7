"""Budget control and length shaping: rewards rewritten after scoring, before advantages.

Applied in this order to each group of K samples (docs/kimi-methods.md §2), every one optional:
1. K2 token budget (§2.1): a response cut off by the budget (finish reason "length") gets
   `truncation_reward` instead of its score; the budget itself is the sampler's max_new_tokens.
2. K2.5 Toggle (§2.2): in the budget-limited phase (floor(step / m) even), a response longer than its
   prompt's budget earns 0, unless the group's accuracy is below lambda. A prompt's budget is the
   rho-th percentile of its correct responses' lengths under the initial policy, estimated once.
3. K1.5 length penalty (§2.3): weight * len_reward added from `start_step` on; len_reward favours the
   shorter correct responses and never rewards wrong ones for being short.

`Sample.task_reward` keeps the verifiable score; `Sample.reward` is what advantages are computed from.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from rl.sample import Sample, by_group


def _correct(s: Sample, threshold: float) -> bool:
    return float(s.task_reward) >= threshold  # type: ignore[arg-type]


def apply_truncation_reward(samples: list[Sample], reward: float) -> None:
    """K2: a response that hit the token budget is truncated and gets `reward` (a penalty)."""
    for s in samples:
        if s.finish_reason == "length":
            s.reward = reward


def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """K1.5's len_reward for one group: lambda = 0.5 - (len - min) / (max - min) if correct, else
    min(0, lambda); all 0 when every length is the same."""
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - low) / (high - low) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


def apply_length_penalty(samples: list[Sample], weight: float, correct_threshold: float = 1.0) -> None:
    for group in by_group(samples).values():
        shaped = length_rewards([len(s.response_ids) for s in group], [_correct(s, correct_threshold) for s in group])
        for s, extra in zip(group, shaped):
            s.reward = float(s.reward) + weight * extra  # type: ignore[arg-type]


def toggle_budget_limited(step: int, phase_steps: int) -> bool:
    """Toggle's Phase0 (budget-limited) at `step`: floor(step / m) even; Phase1 (standard) when odd."""
    return (step // phase_steps) % 2 == 0


def _budget(lengths: list[int], percentile: float) -> int:
    return int(np.ceil(np.percentile(lengths, percentile)))


def estimate_budgets(samples: list[Sample], percentile: float,
                     correct_threshold: float = 1.0) -> tuple[dict[str, int], Optional[int]]:
    """Each prompt's budget, the `percentile` of the lengths of its correct responses (prompts with none
    get no budget), and the same over all prompts (for prompts never estimated: the task's stream of
    generated prompts is endless). Run once, on samples of the initial policy."""
    lengths: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        if _correct(s, correct_threshold):
            lengths[s.prompt].append(len(s.response_ids))
    every = [n for ls in lengths.values() for n in ls]
    return ({prompt: _budget(ls, percentile) for prompt, ls in lengths.items()},
            _budget(every, percentile) if every else None)


def apply_toggle(samples: list[Sample], step: int, phase_steps: int, accuracy_threshold: float,
                 budgets: dict[str, int], default_budget: Optional[int] = None, correct_threshold: float = 1.0) -> int:
    """In Phase0, zero the reward of over-budget responses in groups whose accuracy is >= lambda.

    A prompt without its own budget uses `default_budget` (None: unconstrained). Returns how many
    rewards were zeroed.
    """
    if not toggle_budget_limited(step, phase_steps):
        return 0
    zeroed = 0
    for group in by_group(samples).values():
        accuracy = sum(_correct(s, correct_threshold) for s in group) / len(group)
        budget = budgets.get(group[0].prompt, default_budget)
        if accuracy < accuracy_threshold or budget is None:
            continue
        for s in group:
            if len(s.response_ids) > budget:
                s.reward = 0.0
                zeroed += 1
    return zeroed
