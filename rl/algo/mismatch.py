"""Train-inference mismatch: what is measured of it each step, and the corrections besides TIS.

The rollout engine and the trainer compute the probability of the same sampled token with different
kernels, precisions and (in MoE models) possibly different experts. With r = pi_old / pi_rollout per
token (pi_old: the trainer's, pi_rollout: the engine's that sampled it), the options here
(docs/mismatch.md, with their sources) are:
- token masking (IcePop; masked importance sampling): a token whose r leaves [token_mask_low,
  token_mask_high] is left out of the loss;
- sequence rejection (geometric-mean rejection sampling): a sample whose exp(mean_t log r) leaves
  [sequence_reject_low, sequence_reject_high] is left out whole;
- routing replay (`routing_replay`): the trainer routes each token to the experts the rollout engine
  chose for it ("rollout", R3) or, in the later minibatches of a step, to those its own pi_old pass
  chose ("trainer", R2) (rl/trainer/routing.py).
TIS (`tis_cap`, rl/algo/objectives.py) reweights instead of dropping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

ROUTING_REPLAY = ("off", "rollout", "trainer")
BANDS = (("token_mask_low", "token_mask_high"), ("sequence_reject_low", "sequence_reject_high"))


@dataclass(kw_only=True)  # keyword-only: the objectives' settings that extend this keep their positions
class MismatchSettings:
    """The corrections' knobs (all off by default; the sources' values are in docs/mismatch.md)."""
    # tokens whose pi_old / pi_rollout is outside [low, high] leave the loss (IcePop: 0.5 and 5)
    token_mask_low: Optional[float] = field(default=None, metadata={"gt": 0})
    token_mask_high: Optional[float] = field(default=None, metadata={"gt": 0})
    # samples whose geometric-mean ratio exp(mean_t log(pi_old / pi_rollout)) is outside [low, high] leave it
    sequence_reject_low: Optional[float] = field(default=None, metadata={"gt": 0})
    sequence_reject_high: Optional[float] = field(default=None, metadata={"gt": 0})
    # off | rollout (R3: the engine's experts per token) | trainer (R2: pi_old's experts, in later minibatches)
    routing_replay: str = field(default="off", metadata={"choices": ROUTING_REPLAY})

    def check_bands(self) -> None:
        """Each band is given whole, and holds ratio 1 (a band that drops agreeing tokens is a typo)."""
        for low_name, high_name in BANDS:
            low, high = getattr(self, low_name), getattr(self, high_name)
            if (low is None) != (high is None):
                raise ValueError(f"{low_name}: set it and {high_name} together, or neither (got {low!r}, {high!r})")
            if low is not None and not low <= 1.0 <= high:
                raise ValueError(f"{low_name}: the band [{low}, {high}] must hold 1 (low <= 1 <= high)")


def correction_keep(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                    s: MismatchSettings) -> Optional[torch.Tensor]:
    """1 where a token stays in the loss, 0 where a correction drops it ([batch, seq], detached); None
    when no correction is on. `mask`: the loss tokens (the sequence ratio is their mean)."""
    if s.token_mask_low is None and s.sequence_reject_low is None:
        return None
    log_ratio = (old_logprobs - rollout_logprobs).detach()
    keep = torch.ones_like(log_ratio)
    if s.token_mask_low is not None:
        ratio = log_ratio.exp()
        keep = keep * ((ratio >= s.token_mask_low) & (ratio <= s.token_mask_high)).to(keep.dtype)
    if s.sequence_reject_low is not None:
        geo = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp()
        kept = (geo >= s.sequence_reject_low) & (geo <= s.sequence_reject_high)
        keep = keep * kept.to(keep.dtype)[:, None]
    return keep


# Sums over tokens (and samples) that add up across micro-batches and ranks; `mismatch_metrics` divides.
SUMMED = ("tokens", "abs_sum", "k3_sum", "tis_sum", "tis_truncated", "masked", "samples", "dropped_samples")


def mismatch_sums(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, tokens: torch.Tensor,
                  keep: Optional[torch.Tensor], tis_cap: Optional[float]) -> dict[str, torch.Tensor]:
    """This micro-batch's share of the step's mismatch measures over `tokens` (1 on the trained tokens
    the current weights sampled): |delta logprob| (sum and max), the k3 estimate of KL(rollout || trainer)
    (r - 1 - log r, r = pi_old / pi_rollout, unbiased and >= 0 per token), TIS's weight min(r, cap) and
    how often the cap bit, and what the corrections dropped (tokens; samples left with none)."""
    delta = (old_logprobs - rollout_logprobs).detach()
    ratio = delta.exp()
    cap = tis_cap if tis_cap is not None else float("inf")
    rows = tokens.sum(-1) > 0
    out = {"tokens": tokens.sum(), "abs_sum": (delta.abs() * tokens).sum(),
           "abs_max": (delta.abs() * tokens).amax() if tokens.numel() else delta.new_zeros(()),
           "k3_sum": ((ratio - 1 - delta) * tokens).sum(), "tis_sum": (ratio.clamp(max=cap) * tokens).sum(),
           "tis_truncated": ((ratio > cap).to(tokens.dtype) * tokens).sum(), "samples": rows.sum().to(tokens.dtype)}
    dropped = torch.zeros_like(tokens) if keep is None else (1 - keep) * tokens
    out["masked"] = dropped.sum()
    out["dropped_samples"] = ((dropped.sum(-1) >= tokens.sum(-1)) & rows).sum().to(tokens.dtype)
    return out


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The step's metrics from the summed measures (`mismatch_sums` added over micro-batches and ranks)."""
    tokens, samples = max(sums["tokens"], 1.0), max(sums["samples"], 1.0)
    metrics = {"logprob_mismatch_max": sums["abs_max"], "logprob_mismatch_mean": sums["abs_sum"] / tokens,
               "mismatch_k3_kl": sums["k3_sum"] / tokens, "tis_weight_mean": sums["tis_sum"] / tokens,
               "tis_truncated_share": sums["tis_truncated"] / tokens, "mismatch_masked_share": sums["masked"] / tokens,
               "mismatch_dropped_sample_share": sums["dropped_samples"] / samples}
    if sums.get("routed_tokens", 0) > 0:
        metrics["routing_diff_share"] = sums["routing_diff"] / sums["routed_tokens"]
    return metrics
