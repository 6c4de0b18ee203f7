"""How samples are scored (`rewards`) and the closed-loop critic check (`critic`). Bounds sit in each
field's metadata, checked by rl/config.py before any actor starts; `check()` holds the rest."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from rewards.builtin.self_critique import make_judge
from rewards.runner import DEFAULT_TASK_TYPE


@dataclass
class RewardsConfig:
    """Per task type, a list of rewards combined by weight. Each list item holds
    rewards.runner.RewardSpec's fields (name, weight, per_group, isolation, timeout_s, memory_mb, kwargs);
    "default" serves the task types not listed. Untyped in the schema because OmegaConf cannot add a key
    to a dict of dataclasses from the command line; rl/config.py's `load_config` types the items."""
    task_types: dict[str, Any] = field(default_factory=lambda: {DEFAULT_TASK_TYPE: [{"name": "exact_match"}]})
    # per reward call (one sample, or one group for a per-group reward)
    timeout_s: float = field(default=30.0, metadata={"gt": 0})
    concurrency: int = field(default=8, metadata={"ge": 1})  # reward calls in flight at once
    fallback: float = 0.0  # the score a call that raises, times out or returns NaN/inf gives its samples

    def check(self) -> None:
        if not math.isfinite(self.fallback):
            raise ValueError(f"fallback: must be finite (got {self.fallback!r})")
        for task_type, specs in self.task_types.items():
            if not specs:  # (each RewardSpec checks itself)
                raise ValueError(f"task_types.{task_type}: needs at least one reward (got {specs!r})")


@dataclass
class CriticConfig:
    """The closed-loop critic check (rewards/builtin/critic_data.py): every `every` steps, pairs of a
    verified-correct and a verified-wrong response to the same prompt (task reward at or above
    budget.correct_threshold, or below) from the step's samples of `task_types` go to the judge; its
    agreement with the verifier is logged (critic_agreement) and the pairs are appended to
    <run dir>/critic_pairs.jsonl for refining the critic."""
    every: int = field(default=0, metadata={"ge": 0})  # 0: off
    task_types: list[str] = field(default_factory=list)  # the task types with verifiable rewards
    max_pairs: int = field(default=16, metadata={"ge": 1})
    # rewards.builtin.self_critique.make_judge arguments: base_url ("policy": the run's own rollout
    # engine), model, api, max_tokens, concurrency, request_timeout_s, extra_body
    judge: dict[str, Any] = field(default_factory=lambda: {"base_url": "policy"})

    def check(self) -> None:
        if self.every and not self.task_types:
            raise ValueError(f"task_types: must name the task types with verifiable rewards (got {self.task_types!r})")
        unknown = sorted(set(self.judge) - set(inspect.signature(make_judge).parameters))
        if unknown:
            raise ValueError(f"judge: unknown judge settings {unknown} (got {dict(self.judge)!r})")
