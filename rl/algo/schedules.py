"""Values that change over a run: the sampling temperature and PARL's reward weights.

Temperature decay (Kimi K2 §3.2.3): explore hot early, exploit cool late.

K2 gives no shape or values, so the schedule is configurable: `linear`, `cosine` or `exponential`
(geometric) from the start temperature to the end one over `decay_steps`, constant after. The trainer
computes logprobs from logits / T with the same T the sampler used (docs/kimi-methods.md §1.4).
"""
from __future__ import annotations

import math
from typing import Optional

SCHEDULES = ("linear", "cosine", "exponential")


def temperature_at(step: int, start: float, end: Optional[float], schedule: str, decay_steps: int) -> float:
    """The temperature of RL step `step` (0-based); `end` None means constant `start`."""
    if end is None or decay_steps <= 0:
        return start
    progress = min(step, decay_steps) / decay_steps
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"unknown temperature schedule {schedule!r} (one of {SCHEDULES})")


def parl_lambdas(step: int, lambda_parallel: float, lambda_finish: float, anneal_steps: int,
                 schedule: str) -> tuple[float, float]:
    """PARL's lambda1 and lambda2 at `step` (0-based): from their start values at step 0 to zero at
    step `anneal_steps`, zero after (rewards/builtin/agentic.py applies them)."""
    return (temperature_at(step, lambda_parallel, 0.0, schedule, anneal_steps),
            temperature_at(step, lambda_finish, 0.0, schedule, anneal_steps))
