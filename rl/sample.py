"""The one record a generated sample is carried in, from rollout through reward, advantage and training."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

NOT_ROUTED = -1  # in routing arrays (Sample.routed_experts and the trainer's): no expert given, the router chooses


@dataclass(frozen=True)
class Problem:
    """One task instance before sampling: the prompt text and the reference its reward checks against."""
    prompt: str
    reference: str


@dataclass
class Sample:
    """One response to one prompt. Token ids are the exact sampled ids (token-in, token-out)."""

    group_id: int  # samples of the same prompt share a group (the baseline is taken per group)
    prompt: str
    prompt_ids: list[int]
    reference: str  # the verifiable answer
    family: str = ""  # the task family the prompt was drawn from (rl/data/prompts.py)
    task_type: str = ""  # the prompt's task type (its family's name unless the data says)
    temperature: float = 1.0  # the sampling temperature; the trainer's logprobs use the same
    max_new_tokens: Optional[int] = None  # this response's token budget (per family or prompt; K2)
    metadata: dict[str, Any] = field(default_factory=dict)  # the prompt's data for its rewards (tests, rubrics)
    response_ids: list[int] = field(default_factory=list)
    response: str = ""
    rollout_logprobs: list[float] = field(default_factory=list)  # from the rollout engine, per response token
    finish_reason: str = ""
    weight_version: int = -1  # version of the weights that generated the response (its latest segment)
    token_versions: list[int] = field(default_factory=list)  # per response token: the weights that sampled it
    loss_mask: list[float] = field(default_factory=list)  # per response token, 0 to leave it out; empty: all in
    task_reward: Optional[float] = None  # the rewards' weighted score of the response (rewards/runner.py)
    reward_parts: dict[str, float] = field(default_factory=dict)  # each reward's score and sub-scores, logged
    reward_failures: list[str] = field(default_factory=list)  # why a reward fell back (timeout, error, NaN)
    reward: Optional[float] = None  # after budget control and length shaping (rl/algo/budget.py): what advantages use
    advantage: Optional[float] = None
    old_logprobs: list[float] = field(default_factory=list)  # trainer's logprobs under pi_old
    # MoE: the experts the rollout engine routed each input position to, [len(tokens) - 1, layers, topk]
    # ints (a numpy array; rollout.return_routing), each position as routed in the segment that first fed
    # it; NOT_ROUTED where the trainer is to route (tool results)
    routed_experts: Any = None
    ptx: bool = False  # a curated demonstration for the PTX loss (trained by NLL), not a rollout
    # an agentic episode's rollout.agents.trace.AgentTrace (turns, tools, sub-agents, environment); None
    # otherwise. Tool results sit in response_ids with loss_mask 0; the trainers never see the trace.
    agent: Any = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def trained_tokens(self) -> int:
        """Response tokens in the loss (N of a token mean counts these)."""
        return int(sum(self.loss_mask)) if self.loss_mask else len(self.response_ids)


def by_group(samples: list[Sample]) -> dict[int, list[Sample]]:
    """The samples of each prompt group, in order."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    return groups
