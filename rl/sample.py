"""The one record a generated sample is carried in, from rollout through reward, advantage and training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Sample:
    """One response to one prompt. Token ids are the exact sampled ids (token-in, token-out)."""

    group_id: int  # samples of the same prompt share a group (the baseline is taken per group)
    prompt: str
    prompt_ids: list[int]
    reference: str  # the verifiable answer
    response_ids: list[int] = field(default_factory=list)
    response: str = ""
    rollout_logprobs: list[float] = field(default_factory=list)  # from the rollout engine, per response token
    finish_reason: str = ""
    weight_version: int = -1  # version of the weights that generated the response
    reward: Optional[float] = None
    advantage: Optional[float] = None
    old_logprobs: list[float] = field(default_factory=list)  # trainer's logprobs under pi_old

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids
