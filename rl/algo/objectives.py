"""Policy objectives as pure functions: per-token tensors of one micro-batch in, per-sample losses out.

Every objective returns one loss per sample ([batch]); the trainer multiplies by per-sample weights
computed over the whole minibatch (`sample_weights`) and sums. Normalisers such as "the number of
tokens in the batch" live in the weights, so any split into micro-batches or data-parallel ranks adds
up to the same loss. Token-level objectives return the sum of their token terms; the aggregation
(token mean, per-sequence mean, ...) is the choice of weights.

Notation (docs/kimi-methods.md §1): l = logp - logp_old per token, rho = exp(l), A the sample's advantage.

- kimi_k2 (K1.5/K2, §1.2): -(A * sum_t logp - tau/2 * (sum_t l)^2), sequence level.
- kimi_k25 (K2.5, §1.3): per token -(m * rho * A) + tau * l^2 with the mask
  m = 1[alpha <= rho <= beta] (ratio bounds, ambiguity 2); `mask_tau` masks the tau term too
  (ambiguity 3); pi_old is the trainer's recomputation or the rollout engine's logprobs (ambiguity 4).
- ppo_clip (and grpo, which differs in its advantages): -min(rho * A, clip(rho, 1 - eps_low,
  1 + eps_high) * A) per token; eps_high > eps_low is DAPO's clip-higher.
- gspo: the same clipped form on the sequence ratio s = exp(mean_t l), per sample.

Truncated importance sampling (TIS) multiplies token terms by min(pi_old / pi_rollout, cap), detached:
a correction for the gap between the trainer's and the rollout engine's probabilities. The other
corrections (token masking, sequence rejection: rl/algo/mismatch.py) drop tokens from the mask first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rl.algo.mismatch import MismatchSettings, correction_keep

AGGREGATIONS = ("group_mean", "sample_mean", "token_mean", "sequence_mean_token_mean")
OLD_POLICIES = ("trainer", "rollout")


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's per-token tensors, [batch, seq] aligned to next-token targets (advantages:
    [batch]). logprobs carry the gradient; old_logprobs are the trainer's pi_old; token_weights are
    TIS's detached weights (None without TIS or for sequence-level objectives)."""
    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    token_weights: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Objective:
    """A registered policy loss: per-sample losses [batch] from LossInputs and the settings."""
    loss: Callable[[LossInputs, "ObjectiveSettings"], torch.Tensor]
    sequence_level: bool  # one term per sample: token aggregations and TIS do not apply
    aggregation: str  # the aggregation used unless `loss_aggregation` says otherwise


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, sequence_level: bool = False, aggregation: str = "token_mean"):
    """Add a policy loss under `name` (then `algorithm.objective=<name>` selects it)."""
    def add(loss):
        OBJECTIVES[name] = Objective(loss, sequence_level, aggregation)
        return loss
    return add


@dataclass
class ObjectiveSettings(MismatchSettings):
    """The knobs of every objective and of the mismatch corrections (rl/algo/mismatch.py); rl/algo/config.py's
    AlgorithmConfig extends this; the defaults are ours where Kimi is silent). Bounds sit in each field's
    metadata, checked before a run starts."""
    objective: str = field(default="kimi_k2", metadata={"choices": OBJECTIVES})
    tau: float = field(default=0.01, metadata={"ge": 0})  # kimi_*: weight of the squared log-ratio
    # kimi_k25: alpha and beta (undisclosed)
    ratio_low: float = field(default=0.5, metadata={"gt": 0, "why": "kimi_k25's alpha bounds the ratio"})
    ratio_high: float = 2.0
    mask_tau: bool = False  # kimi_k25: drop the tau term on masked tokens too
    # kimi_k25: pi_old = trainer's recomputed logprobs, or the rollout engine's
    old_policy: str = field(default="trainer", metadata={"choices": OLD_POLICIES})
    clip_low: float = field(default=0.2, metadata={"ge": 0, "lt": 1})  # ppo_clip / grpo: eps_low
    # ppo_clip / grpo: eps_high (DAPO's clip-higher: 0.28)
    clip_high: float = field(default=0.2, metadata={"ge": 0})
    # gspo: the GSPO paper's sequence-ratio clip range
    gspo_clip_low: float = field(default=3e-4, metadata={"ge": 0, "lt": 1})
    gspo_clip_high: float = field(default=4e-4, metadata={"ge": 0})
    # truncated importance sampling cap C (token-level objectives); None: off
    tis_cap: Optional[float] = field(default=None, metadata={"gt": 0})
    # None: the objective's own (OBJECTIVES[objective].aggregation)
    loss_aggregation: Optional[str] = field(default=None, metadata={"choices": AGGREGATIONS})

    def check(self) -> None:
        """The checks that span fields (ValueError names the field)."""
        self.check_bands()
        if not self.ratio_low < self.ratio_high:
            raise ValueError(f"ratio_low: must be < algorithm.ratio_high ({self.ratio_high}) (alpha < beta) "
                             f"(got {self.ratio_low!r})")
        sequence_level = OBJECTIVES[self.objective].sequence_level
        if self.tis_cap is not None and sequence_level:
            raise ValueError(f"tis_cap: applies to token-level objectives only, not {self.objective} "
                             f"(got {self.tis_cap!r})")
        if sequence_level and self.aggregation not in ("group_mean", "sample_mean"):
            raise ValueError(f"loss_aggregation: {self.objective} is sequence level: group_mean or sample_mean "
                             f"(got {self.loss_aggregation!r})")

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or OBJECTIVES[self.objective].aggregation


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(dim=-1)


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), elementwise (PPO's pessimistic bound)."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages)


# K2 averages per prompt (1/K) then over prompts
@register_objective("kimi_k2", sequence_level=True, aggregation="group_mean")
def kimi_k2(x: LossInputs, s: ObjectiveSettings) -> torch.Tensor:
    """-(A * logp_seq - tau/2 * (logp_seq - logp_old_seq)^2): the surrogate whose gradient is K1.5 eq. (3)."""
    logp_seq = _masked_sum(x.logprobs, x.mask)
    return -(x.advantages * logp_seq - 0.5 * s.tau * (logp_seq - _masked_sum(x.old_logprobs, x.mask)) ** 2)


# K2.5 divides by the batch's generated tokens N
@register_objective("kimi_k25")
def kimi_k25(x: LossInputs, s: ObjectiveSettings) -> torch.Tensor:
    """Sum over tokens of -(m * rho * A) + tau * l^2, m = 1[alpha <= rho <= beta] (a detached mask);
    pi_old is the rollout engine's logprobs with `old_policy: rollout`."""
    logprobs, advantages, token_weights = x.logprobs, x.advantages, x.token_weights
    log_ratio = logprobs - (x.rollout_logprobs if s.old_policy == "rollout" else x.old_logprobs)
    ratio = log_ratio.exp()
    keep = ((ratio >= s.ratio_low) & (ratio <= s.ratio_high)).to(logprobs.dtype).detach()
    policy = -keep * ratio * advantages[:, None]
    if token_weights is not None:
        policy = policy * token_weights
    penalty = s.tau * log_ratio ** 2
    if s.mask_tau:
        penalty = penalty * keep
    return _masked_sum(policy + penalty, x.mask)


# DAPO (and TRL's default) is token mean; grpo differs from ppo_clip in its advantages only
@register_objective("grpo")
@register_objective("ppo_clip")
def ppo_clip(x: LossInputs, s: ObjectiveSettings) -> torch.Tensor:
    """Sum over tokens of PPO's clipped surrogate (asymmetric with clip_high > clip_low)."""
    terms = _clipped_surrogate((x.logprobs - x.old_logprobs).exp(), x.advantages[:, None], s.clip_low, s.clip_high)
    if x.token_weights is not None:
        terms = terms * x.token_weights
    return _masked_sum(terms, x.mask)


@register_objective("gspo", sequence_level=True, aggregation="sample_mean")
def gspo(x: LossInputs, s: ObjectiveSettings) -> torch.Tensor:
    """The clipped surrogate on the length-normalised sequence ratio exp(mean_t l)."""
    lengths = x.mask.sum(dim=-1).clamp(min=1)
    ratio = (_masked_sum(x.logprobs - x.old_logprobs, x.mask) / lengths).exp()
    return _clipped_surrogate(ratio, x.advantages, s.gspo_clip_low, s.gspo_clip_high)


def truncated_importance_weights(old_logprobs, rollout_logprobs, cap: float) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap) per token (detached): TIS for the train-inference mismatch."""
    return (old_logprobs - rollout_logprobs).exp().clamp(max=cap).detach()


def sample_losses(s: ObjectiveSettings, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                  rollout_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The configured objective's per-sample losses [batch] for one micro-batch.

    logprobs (with grad), old_logprobs (trainer, pi_old), rollout_logprobs (the sampler's), mask:
    [batch, seq] aligned to next-token targets; advantages: [batch].
    """
    objective = OBJECTIVES.get(s.objective)
    if objective is None:
        raise ValueError(f"unknown objective {s.objective!r} (one of {tuple(OBJECTIVES)})")
    token_weights = None
    if s.tis_cap is not None and not objective.sequence_level:
        token_weights = truncated_importance_weights(old_logprobs, rollout_logprobs, s.tis_cap)
    mask = mask.to(logprobs.dtype)
    keep = correction_keep(old_logprobs, rollout_logprobs, mask, s)  # IcePop / MIS masks, sequence rejection
    if keep is not None:
        mask = mask * keep
    inputs = LossInputs(logprobs, old_logprobs, rollout_logprobs, advantages, mask, token_weights)
    return objective.loss(inputs, s)


def sample_weights(group_ids: list[int], response_lengths: list[int], aggregation: str) -> torch.Tensor:
    """Each sample's weight in the minibatch loss sum_i w_i * loss_i (`response_lengths`: the trained
    tokens of each response), for an aggregation of:
    - group_mean: mean over prompts of the mean over the prompt's samples (1 / (groups * K));
    - sample_mean: mean over samples (1 / B);
    - token_mean: sum of token terms over the batch's generated tokens (1 / N);
    - sequence_mean_token_mean: each sample's token mean, then mean over samples (1 / (B * |y_i|)).
    """
    n = len(group_ids)
    if n == 0:
        raise ValueError("sample_weights: no samples")
    lengths = torch.tensor(response_lengths, dtype=torch.float32).clamp(min=1)
    if aggregation == "group_mean":
        _, index, sizes = torch.unique(torch.tensor(group_ids), return_inverse=True, return_counts=True)
        return 1.0 / (len(sizes) * sizes[index].to(torch.float32))
    if aggregation == "sample_mean":
        return torch.full((n,), 1.0 / n)
    if aggregation == "token_mean":
        return torch.full((n,), 1.0 / float(max(1, sum(response_lengths))))
    if aggregation == "sequence_mean_token_mean":
        return 1.0 / (n * lengths)
    raise ValueError(f"unknown loss aggregation {aggregation!r} (one of {AGGREGATIONS})")
