"""Rewards of agentic episodes: the environment's verdict, and PARL's shaping (Kimi K2.5 §3).

r_PARL = r_perf + lambda1 * r_parallel + lambda2 * r_finish, with lambda1 and lambda2 annealed to zero
over training (rl/algo/schedules.py). r_perf is the task reward (the `environment` reward below, or any other); the two
auxiliary terms are applied after it, like the budget shaping, because their weights depend on the
step. The report does not define the terms; ours are configurable (docs/kimi-methods.md §7):

- r_parallel, against serial collapse: `count` = min(sub-agents instantiated, cap) / cap, or
  `stages` = the share of the episode's stages that ran at least two sub-agents in parallel;
- r_finish, against spurious parallelism: assigned sub-tasks completed / assigned (0 if none).
"""
from __future__ import annotations

from rewards.registry import reward

PARALLEL_MODES = ("count", "stages")


@reward("environment")
def environment_reward(sample):
    """The episode's outcome as its environment scored it (`Environment.reward` at the final answer)."""
    trace = sample.agent
    if trace is None or trace.env_reward is None:
        raise ValueError("the environment reward needs an agentic episode (agent.environment)")
    return trace.env_reward, trace.env_reward_parts


def r_parallel(trace, mode: str, cap: int) -> float:
    if mode == "count":
        return min(len(trace.subagents), cap) / cap
    if mode == "stages":
        return sum(len(s.sub_steps) >= 2 for s in trace.stages) / len(trace.stages) if trace.stages else 0.0
    raise ValueError(f"unknown r_parallel mode {mode!r} (one of {PARALLEL_MODES})")


def r_finish(trace) -> float:
    return sum(run.completed for run in trace.subagents) / len(trace.subagents) if trace.subagents else 0.0


def apply_parl(samples: list, lambda1: float, lambda2: float, mode: str, cap: int,
               budget_penalty: float = 0.0) -> None:
    """Add the PARL terms to each episode's reward (its task reward so far); episodes stopped by the
    critical-steps budget also get `budget_penalty`. The terms are kept in `reward_parts`."""
    for s in samples:
        parallel, finish = r_parallel(s.agent, mode, cap), r_finish(s.agent)
        penalty = budget_penalty if s.agent.stop == "critical_steps" else 0.0
        s.reward = float(s.reward) + lambda1 * parallel + lambda2 * finish + penalty
        s.reward_parts.update({"parl/r_parallel": parallel, "parl/r_finish": finish})
