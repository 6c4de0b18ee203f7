"""Advantages and policy objectives as pure functions over per-token tensors.

The Kimi K1.5/K2 objective (kimi-rl-spec §1.2, §1.4(a)): for the K responses to one prompt,

    L = (1/K) * sum_i ( r_i - mean(r) - tau * log(pi_theta(y_i)/pi_old(y_i)) )^2

whose gradient (up to the positive factor 2*tau) equals that of the surrogate we minimise,

    loss = -(1/K) * sum_i [ A_i * logp_i - (tau/2) * (logp_i - logp_old_i)^2 ],   A_i = r_i - mean(r),

with logp_i the *sum* of the response's token logprobs (no length normalisation). The batch loss is
the mean of that over prompts.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from rl.sample import Sample


def group_mean_advantages(samples: list[Sample]) -> None:
    """Set each sample's advantage to its reward minus the mean reward of its group (Kimi baseline)."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    for members in groups.values():
        mean = sum(float(s.reward) for s in members) / len(members)  # type: ignore[arg-type]
        for s in members:
            s.advantage = float(s.reward) - mean  # type: ignore[arg-type]


def group_mean_weights(group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's weight in "mean over groups of the mean over the group": 1 / (groups * group size).

    Per-sample weights keep the loss separable, so any split into micro-batches or data-parallel
    ranks adds up to the same total.
    """
    _, group_index, group_sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return 1.0 / (len(group_sizes) * group_sizes[group_index].to(torch.float32))


def kimi_k2_sample_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Per-sample Kimi K2 surrogate, -(A_i * logp_i - tau/2 * (logp_i - logp_old_i)^2): [batch].

    logprobs, old_logprobs, loss_mask: [batch, seq] per-token values (mask 1 on trained tokens).
    """
    mask = loss_mask.to(logprobs.dtype)
    logp_seq = (logprobs * mask).sum(dim=-1)
    logp_old_seq = (old_logprobs * mask).sum(dim=-1)
    return -(advantages * logp_seq - 0.5 * tau * (logp_seq - logp_old_seq) ** 2)


def kimi_k2_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    group_ids: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Sequence-level Kimi K2 surrogate loss: the mean over groups of the per-group mean of
    `kimi_k2_sample_losses`. advantages, group_ids: [batch]."""
    weights = group_mean_weights(group_ids).to(logprobs.device, logprobs.dtype)
    return (weights * kimi_k2_sample_losses(logprobs, old_logprobs, advantages, loss_mask, tau)).sum()
