"""Policy objectives as pure functions: per-token tensors of one micro-batch in, per-sample losses out.

Every objective returns one loss per sample ([batch]); the trainer multiplies by per-sample weights
computed over the whole minibatch (`sample_weights`) and sums. Normalisers such as "the number of
tokens in the batch" live in the weights, so any split into micro-batches or data-parallel ranks adds
up to the same loss. Token-level objectives return the sum of their token terms; the aggregation
(token mean, per-sequence mean, ...) is the choice of weights.

Notation (kimi-rl-spec.md §1): l = logp - logp_old per token, rho = exp(l), A the sample's advantage.

- kimi_k2 (K1.5/K2, §1.2, §1.4(a)): -(A * sum_t logp - tau/2 * (sum_t l)^2), sequence level.
- kimi_k25 (K2.5, §1.3, §1.4(b)): per token -(m * rho * A) + tau * l^2 with the mask
  m = 1[alpha <= rho <= beta] (ratio bounds, ambiguity 2); `mask_tau` masks the tau term too
  (ambiguity 3); pi_old is the trainer's recomputation or the rollout engine's logprobs (ambiguity 4).
- ppo_clip (and grpo, which differs in its advantages): -min(rho * A, clip(rho, 1 - eps_low,
  1 + eps_high) * A) per token; eps_high > eps_low is DAPO's clip-higher.
- gspo: the same clipped form on the sequence ratio s = exp(mean_t l), per sample.

Truncated importance sampling (TIS) multiplies token terms by min(pi_old / pi_rollout, cap), detached:
a correction for the gap between the trainer's and the rollout engine's probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

OBJECTIVES = ("kimi_k2", "kimi_k25", "grpo", "ppo_clip", "gspo")
SEQUENCE_LEVEL = ("kimi_k2", "gspo")  # one term per sample: token aggregations do not apply
AGGREGATIONS = ("group_mean", "sample_mean", "token_mean", "sequence_mean_token_mean")
# The aggregation each objective uses unless configured: K2 averages per prompt (1/K) then over
# prompts; K2.5 divides by the batch's generated tokens N; DAPO (and TRL's default) is token mean.
DEFAULT_AGGREGATION = {"kimi_k2": "group_mean", "kimi_k25": "token_mean", "grpo": "token_mean",
                       "ppo_clip": "token_mean", "gspo": "sample_mean"}
OLD_POLICIES = ("trainer", "rollout")


@dataclass
class ObjectiveSettings:
    """The knobs of every objective (validated by rl.config, whose `algorithm` section extends this;
    the defaults are ours where Kimi is silent)."""
    objective: str = "kimi_k2"  # one of OBJECTIVES
    tau: float = 0.01  # kimi_*: weight of the squared log-ratio
    ratio_low: float = 0.5  # kimi_k25: alpha (undisclosed)
    ratio_high: float = 2.0  # kimi_k25: beta (undisclosed)
    mask_tau: bool = False  # kimi_k25: drop the tau term on masked tokens too
    old_policy: str = "trainer"  # kimi_k25: pi_old = trainer's recomputed logprobs, or the rollout engine's
    clip_low: float = 0.2  # ppo_clip / grpo: eps_low
    clip_high: float = 0.2  # ppo_clip / grpo: eps_high (DAPO's clip-higher: 0.28)
    gspo_clip_low: float = 3e-4  # gspo: the GSPO paper's sequence-ratio clip range
    gspo_clip_high: float = 4e-4
    tis_cap: Optional[float] = None  # truncated importance sampling cap C (token-level objectives); None: off
    loss_aggregation: Optional[str] = None  # one of AGGREGATIONS; None: DEFAULT_AGGREGATION[name]

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or DEFAULT_AGGREGATION[self.objective]


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(dim=-1)


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), elementwise (PPO's pessimistic bound)."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages)


def kimi_k2(logprobs, old_logprobs, advantages, mask, s: ObjectiveSettings) -> torch.Tensor:
    """-(A * logp_seq - tau/2 * (logp_seq - logp_old_seq)^2): the surrogate whose gradient is K1.5 eq. (3)."""
    logp_seq = _masked_sum(logprobs, mask)
    return -(advantages * logp_seq - 0.5 * s.tau * (logp_seq - _masked_sum(old_logprobs, mask)) ** 2)


def kimi_k25(logprobs, old_logprobs, advantages, mask, s: ObjectiveSettings, token_weights=None) -> torch.Tensor:
    """Sum over tokens of -(m * rho * A) + tau * l^2, m = 1[alpha <= rho <= beta] (a detached mask)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    keep = ((ratio >= s.ratio_low) & (ratio <= s.ratio_high)).to(logprobs.dtype).detach()
    policy = -keep * ratio * advantages[:, None]
    if token_weights is not None:
        policy = policy * token_weights
    penalty = s.tau * log_ratio ** 2
    if s.mask_tau:
        penalty = penalty * keep
    return _masked_sum(policy + penalty, mask)


def ppo_clip(logprobs, old_logprobs, advantages, mask, s: ObjectiveSettings, token_weights=None) -> torch.Tensor:
    """Sum over tokens of PPO's clipped surrogate (asymmetric with clip_high > clip_low)."""
    terms = _clipped_surrogate((logprobs - old_logprobs).exp(), advantages[:, None], s.clip_low, s.clip_high)
    if token_weights is not None:
        terms = terms * token_weights
    return _masked_sum(terms, mask)


def gspo(logprobs, old_logprobs, advantages, mask, s: ObjectiveSettings) -> torch.Tensor:
    """The clipped surrogate on the length-normalised sequence ratio exp(mean_t l)."""
    lengths = mask.sum(dim=-1).clamp(min=1)
    ratio = (_masked_sum(logprobs - old_logprobs, mask) / lengths).exp()
    return _clipped_surrogate(ratio, advantages, s.gspo_clip_low, s.gspo_clip_high)


def truncated_importance_weights(old_logprobs, rollout_logprobs, cap: float) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap) per token (detached): TIS for the train-inference mismatch."""
    return (old_logprobs - rollout_logprobs).exp().clamp(max=cap).detach()


def sample_losses(s: ObjectiveSettings, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                  rollout_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The configured objective's per-sample losses [batch] for one micro-batch.

    logprobs (with grad), old_logprobs (trainer, pi_old), rollout_logprobs (the sampler's), mask:
    [batch, seq] aligned to next-token targets; advantages: [batch].
    """
    mask = mask.to(logprobs.dtype)
    if s.objective == "kimi_k2":
        return kimi_k2(logprobs, old_logprobs, advantages, mask, s)
    if s.objective == "gspo":
        return gspo(logprobs, old_logprobs, advantages, mask, s)
    token_weights = None
    if s.tis_cap is not None:
        token_weights = truncated_importance_weights(old_logprobs, rollout_logprobs, s.tis_cap)
    if s.objective == "kimi_k25":
        old = rollout_logprobs if s.old_policy == "rollout" else old_logprobs
        return kimi_k25(logprobs, old, advantages, mask, s, token_weights)
    if s.objective in ("ppo_clip", "grpo"):
        return ppo_clip(logprobs, old_logprobs, advantages, mask, s, token_weights)
    raise ValueError(f"unknown objective {s.objective!r} (one of {OBJECTIVES})")


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
