"""Splitting a minibatch of samples into padded micro-batches by a token budget, per data-parallel rank.

Every DP rank gets the same number of micro-batches with the same shapes: micro-batch j is a run of
samples consecutive in length order (rows of one micro-batch are of similar length, so little of it
is padding; each row keeps its index in the minibatch), dealt round-robin to the DP ranks and padded
with empty rows (weight 0, no loss tokens) to equal size. Equal shapes matter because MoE layers
all-gather tokens across expert-parallel ranks, which are data-parallel ranks too. The token budget
bounds each rank's padded rows x width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rl.sample import NOT_ROUTED, Sample


@dataclass
class MicroBatch:
    """Right-padded tensors; per-token fields are aligned to next-token targets (width - 1)."""
    tokens: torch.Tensor  # [rows, width] token ids
    loss_mask: torch.Tensor  # [rows, width - 1], 1 on response tokens
    old_logprobs: torch.Tensor  # [rows, width - 1] the trainer's, under pi_old (where old_given)
    rollout_logprobs: torch.Tensor  # [rows, width - 1] the rollout engine's, for the same tokens
    advantages: torch.Tensor  # [rows]
    weights: torch.Tensor  # [rows] the sample's weight in the minibatch loss (0 for padding rows)
    index: torch.Tensor  # [rows] the sample's position in the minibatch (-1 for padding rows)
    ptx: torch.Tensor  # [rows] 1.0 for PTX demonstrations (NLL), 0.0 for rollouts (the RL objective)
    temperature: torch.Tensor  # [rows] each sample's sampling temperature (1.0 for padding rows)
    old_given: torch.Tensor  # [rows] 1.0 where the sample carries pi_old; else the forward's own logprobs are it
    fresh: torch.Tensor  # [rows, width - 1] 1 on loss tokens sampled by weight version `version` (the mismatch's)
    first: int = 0  # the first position any row predicts a response token from (its logits are all we need)
    # MoE routing per input position [rows, width, layers, topk] (rl/trainer/routing.py; -1: not given):
    replay: Optional[torch.Tensor] = None  # the experts to replay (routing_replay), None: the router chooses
    rollout_routing: Optional[torch.Tensor] = None  # the rollout engine's, which the routing-difference metric reads


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_micro_batches(samples: list[Sample], weights: Optional[torch.Tensor], dp_size: int, dp_rank: int,
                        token_budget: int, width_multiple: int = 1, uniform: bool = False,
                        version: Optional[int] = None, replay: Optional[list] = None,
                        compare_routing: bool = False) -> list[MicroBatch]:
    """This DP rank's micro-batches of `samples` (by length), each within `token_budget` padded tokens
    per rank where possible (a single over-long sample still gets a micro-batch of its own). `version`:
    the weight version whose sampled tokens are marked `fresh`. `replay`: per sample, the experts its
    forward replays ([positions, layers, topk] or None); None: no replay. `compare_routing`: also carry
    the rollout engine's routing (`rollout_routing`) for the routing-difference metric.

    `uniform` pads every micro-batch to the same rows and width: pipeline stages exchange activations
    of one fixed shape.
    """
    if not samples:
        raise ValueError("split_micro_batches: no samples")
    runs: list[list[int]] = [[]]
    width = 0
    by_length = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens))
    for i in by_length:
        s = samples[i]
        new_width = _round_up(max(width, len(s.tokens)), width_multiple)
        rows = -(-(len(runs[-1]) + 1) // dp_size)
        if runs[-1] and rows * new_width > token_budget:
            runs.append([])
            new_width = _round_up(len(s.tokens), width_multiple)
        runs[-1].append(i)
        width = new_width
    shapes = [(-(-len(run) // dp_size), _round_up(max(len(samples[i].tokens) for i in run), width_multiple))
              for run in runs]
    if uniform:
        shapes = [(max(r for r, _ in shapes), max(w for _, w in shapes))] * len(runs)
    batches = []
    for run, (rows, width) in zip(runs, shapes):
        mine = run[dp_rank::dp_size]
        batch = _pack([samples[i] for i in mine], mine, weights, rows, width, version)
        if compare_routing:
            batch.rollout_routing = _routing([samples[i].routed_experts for i in mine], rows, width)
        if replay is not None:  # R3 replays the rollout's own routing: one tensor serves both
            same = compare_routing and all(replay[i] is samples[i].routed_experts for i in mine)
            batch.replay = batch.rollout_routing if same else _routing([replay[i] for i in mine], rows, width)
        batches.append(batch)
    return batches


def _routing(per_sample: list, rows: int, width: int) -> Optional[torch.Tensor]:
    """Per-sample routing arrays ([positions, layers, topk]) as one [rows, width, layers, topk] tensor,
    NOT_ROUTED where not given; None when no sample has any."""
    given = [(row, r) for row, r in enumerate(per_sample) if r is not None and len(r)]
    if not given:
        return None
    out = torch.full((rows, width, *given[0][1].shape[1:]), NOT_ROUTED, dtype=torch.int32)
    for row, r in given:
        out[row, :len(r)] = torch.tensor(np.asarray(r), dtype=torch.int32)
    return out


def carries_old(s: Sample) -> bool:
    """Whether `s` brings its own pi_old (PTX demonstrations need none)."""
    return s.ptx or len(s.old_logprobs) == len(s.response_ids) > 0


def _pack(part: list[Sample], index: list[int], weights: Optional[torch.Tensor], rows: int, width: int,
          version: Optional[int]) -> MicroBatch:
    tokens = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width - 1)
    old, rollout = torch.zeros(rows, width - 1), torch.zeros(rows, width - 1)
    batch = MicroBatch(tokens, loss_mask, old, rollout, advantages=torch.zeros(rows), weights=torch.zeros(rows),
                       index=torch.full((rows,), -1, dtype=torch.long), ptx=torch.zeros(rows),
                       temperature=torch.ones(rows), old_given=torch.zeros(rows), fresh=torch.zeros(rows, width - 1),
                       first=max(0, min((len(s.prompt_ids) for s in part), default=1) - 1))
    for row, (s, i) in enumerate(zip(part, index)):
        tokens[row, : len(s.tokens)] = torch.tensor(s.tokens)
        start, end = len(s.prompt_ids) - 1, len(s.tokens) - 1
        loss_mask[row, start:end] = torch.tensor(s.loss_mask) if s.loss_mask else 1.0
        if carries_old(s):
            batch.old_given[row] = 1.0
            if s.old_logprobs:
                old[row, start:end] = torch.tensor(s.old_logprobs)
        if version is not None and s.token_versions:
            batch.fresh[row, start:end] = loss_mask[row, start:end] * (torch.tensor(s.token_versions) == version)
        if s.rollout_logprobs:
            rollout[row, start:end] = torch.tensor(s.rollout_logprobs)
        batch.advantages[row] = s.advantage or 0.0
        batch.weights[row] = 0.0 if weights is None else weights[i]
        batch.index[row] = i
        batch.ptx[row] = float(s.ptx)
        batch.temperature[row] = s.temperature
    return batch
