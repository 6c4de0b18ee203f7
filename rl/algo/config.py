"""The algorithm's settings: the policy objective and how rollouts become updates (`algorithm`), budget
control and length shaping (`budget`), and the PTX loss (`ptx`). Bounds sit in each field's metadata,
checked by rl/config.py before any actor starts; `check()` holds the checks that span fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rl.algo.objectives import ObjectiveSettings


@dataclass
class AlgorithmConfig(ObjectiveSettings):
    """The policy objective (ObjectiveSettings' fields: objective, tau, ratio_low, ratio_high, mask_tau,
    old_policy, clip_low, clip_high, gspo_clip_low, gspo_clip_high, tis_cap, loss_aggregation) and how
    each iteration's rollouts become updates."""
    normalize_advantages: Optional[bool] = None  # divide by the group's reward std; None: for grpo only
    # DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill,
    # up to `max_sampling_rounds` generation rounds per step.
    filter_uniform_groups: bool = False
    max_sampling_rounds: int = field(default=3, metadata={"ge": 1})
    # gradient steps per RL iteration (mini-batches over the rollout); must divide rollout.prompts_per_step
    updates_per_step: int = field(default=1, metadata={"ge": 1})
    reset_optimizer_each_step: bool = False  # K1.5 resets the optimizer every iteration

    @property
    def std_normalized(self) -> bool:
        return self.objective == "grpo" if self.normalize_advantages is None else self.normalize_advantages


@dataclass
class BudgetConfig:
    """Budget control and length shaping (rl/algo/budget.py, docs/kimi-methods.md); all off by default.
    The K2 token budget is rollout.max_new_tokens; Kimi's values are undisclosed, these defaults are ours."""
    truncation_reward: Optional[float] = None  # K2: reward of a response cut off by the budget; None: scored as is
    length_penalty_weight: float = field(default=0.0, metadata={"ge": 0})  # K1.5 length penalty weight; 0: off
    # K1.5 warm-up: steps of plain RL before the penalty starts
    length_penalty_start_step: int = field(default=0, metadata={"ge": 0})
    toggle: bool = False  # K2.5 Toggle
    toggle_phase_steps: int = field(default=10, metadata={"ge": 1})  # m: steps per phase (budget-limited first)
    # lambda: the budget applies to groups at least this accurate
    toggle_accuracy_threshold: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    # rho: a prompt's budget is this percentile of its correct lengths
    toggle_percentile: float = field(default=50.0, metadata={"ge": 0, "le": 100})
    # prompts (K samples each) rolled out once at the start to set budgets
    toggle_estimate_prompts: int = field(default=64, metadata={"ge": 1})
    correct_threshold: float = 1.0  # a task reward at or above this counts as correct


@dataclass
class PTXConfig:
    """The PTX loss (Kimi K2; rl/algo/ptx.py): coef * token-mean NLL of curated demonstrations, in every
    RL update. Kimi's coefficient and data are undisclosed; off by default."""
    coef: float = field(default=0.0, metadata={"ge": 0})  # 0: off
    path: Optional[str] = None  # JSONL or parquet with `prompt` and `response`; None: the task's own answers
    samples_per_step: int = field(default=16, metadata={"ge": 1})  # demonstrations per RL step (dealt to its minibatches)
