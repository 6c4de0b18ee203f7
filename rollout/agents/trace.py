"""What an agent episode did, beside its tokens: stages, steps, tool calls, sub-agents, why it stopped.

Kept on `Sample.agent` while the episode runs (its environment's state included, so a paused episode
continues where it stopped) and read by the PARL reward and the step's metrics. Never sent to the
trainers (`for_training`).

Critical steps (Kimi K2.5 §3): an episode is a sequence of stages; in each the main agent takes a step
(one turn: a model call and the tools it calls) and, when it assigns tasks, a group of sub-agents runs
in parallel. The stage costs its main steps plus the longest sub-agent branch:
``CriticalSteps = sum_t (S_main^t + max_i S_sub,i^t)``. Total steps add every branch instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Stage:
    main_steps: int = 1
    sub_steps: list[int] = field(default_factory=list)  # steps of each sub-agent this stage ran

    @property
    def critical_steps(self) -> int:
        return self.main_steps + max(self.sub_steps, default=0)

    @property
    def total_steps(self) -> int:
        return self.main_steps + sum(self.sub_steps)


@dataclass
class SubagentRun:
    """One assigned task: kept for logging and accounting, never trained on."""
    agent: str
    prompt: str
    message: str  # the single message returned to the orchestrator
    steps: int
    completed: bool  # ended with a final message within its limits
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)


@dataclass
class AgentTrace:
    env: Any  # the episode's rollout.agents.environments.Environment (its state travels with the episode)
    stages: list[Stage] = field(default_factory=list)
    tool_calls: int = 0
    invalid_calls: int = 0
    answer: Optional[str] = None  # the final message's answer, once given
    stop: str = ""  # answer | max_turns | max_tool_calls | max_tokens | critical_steps | max_context ("" while running)
    env_reward: Optional[float] = None
    env_reward_parts: dict[str, float] = field(default_factory=dict)
    subagents: list[SubagentRun] = field(default_factory=list)
    created_subagents: dict[str, str] = field(default_factory=dict)  # name -> system prompt
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each sampled turn in response_ids
    seconds: float = 0.0  # wall-clock the episode has run (over all its iterations when paused and continued)

    @property
    def turns(self) -> int:
        return len(self.stages)

    @property
    def critical_steps(self) -> int:
        return sum(s.critical_steps for s in self.stages)

    @property
    def total_steps(self) -> int:
        return sum(s.total_steps for s in self.stages)

    @property
    def done(self) -> bool:
        return bool(self.stop)


def for_training(samples: list) -> list:
    """The samples as the trainers get them: tokens, masks and rewards, without the agent trace."""
    return [dataclasses.replace(s, agent=None) if s.agent is not None else s for s in samples]
