"""What a trainer rank computes: per-token logprobs of responses, and the gradients of the policy loss
(with PTX), through Megatron's forward(-backward) schedules over this rank's micro-batches.

Each function takes the rank (rl/trainer/engine.py's TrainingEngine: its model, DDP wrapper, layout,
device and vocabulary) and is collective over the rank's groups where it says so.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from rl.algo.objectives import ObjectiveSettings, sample_losses, sample_weights
from rl.sample import Sample
from rl.trainer.micro_batches import MicroBatch, split_micro_batches
from rl.trainer.response_logits import labels_for, logprobs_from_logits, logprobs_from_loss
from rl.trainer.sharding import is_expert, tensor_parallel_of


def run_schedule(rank, batches: list[MicroBatch], loss_func, forward_only: bool) -> list[dict]:
    """Megatron's forward(-backward) schedule (1F1B under PP) over this rank's micro-batches;
    `loss_func(batch, logprobs)` gets each micro-batch's per-token logprobs [rows, width - 1] of the
    next tokens at each row's temperature (zeros before its first response-predicting position)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    labelled = rank.padded_vocab == rank.vocab_size  # else the padding rows are masked from the logits

    def with_logprobs(batch: MicroBatch, first: int, output: torch.Tensor):
        if labelled:
            return loss_func(batch, logprobs_from_loss(output, first))
        return loss_func(batch, logprobs_from_logits(output, batch.tokens, first, rank.vocab_size, rank.tp_rank))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch.tokens.to(rank.device)
        positions = torch.arange(tokens.shape[1], device=rank.device).expand_as(tokens)
        first, labels = 0, None
        if rank.last_stage:  # only its output layer makes logits: the kept positions, divided by T
            first = rank.response_logits.select(batch.first, batch.temperature)
            labels = labels_for(tokens, first) if labelled else None
        output = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels)
        return output, partial(with_logprobs, batch, first)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[rank.ddp],
        num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=forward_only)


def split(rank, samples: list[Sample], weights: Optional[torch.Tensor] = None,
          version: Optional[int] = None) -> list[MicroBatch]:
    return split_micro_batches(samples, weights, rank.dp, rank.dp_rank, rank.micro_batch_tokens,
                               width_multiple=rank.layout.tensor_parallel_size,
                               uniform=rank.layout.pipeline_parallel_size > 1, version=version)


@torch.no_grad()
def compute_logprobs(rank, samples: list[Sample]) -> list[list[float]]:
    """Per-response-token logprobs of each sample under the current weights, at the sample's
    sampling temperature (on every rank)."""
    rank.ddp.eval()
    batches = split(rank, samples)

    def collect(batch: MicroBatch, logprobs):
        return logprobs.new_zeros(()), {"index": batch.index, "logprobs": logprobs.cpu()}

    found: dict[int, list[float]] = {}
    for out in run_schedule(rank, batches, collect, forward_only=True):
        for row, i in enumerate(out["index"].tolist()):
            if i >= 0:
                s = samples[i]
                found[i] = out["logprobs"][row, len(s.prompt_ids) - 1 : len(s.tokens) - 1].tolist()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, found if (rank.last_stage and rank.tp_rank == 0) else {})
    for part in everyone:
        found.update(part)
    return [found[i] for i in range(len(samples))]


def compute_gradients(rank, samples: list[Sample], objective: ObjectiveSettings,
                      ptx_coef: float = 0.0, version: Optional[int] = None) -> dict[str, float]:
    """Forward and backward over `samples` (one minibatch): DP-reduced grads in `main_grad`.

    Rollouts get the objective, PTX demonstrations (`Sample.ptx`) `ptx_coef` times their token-mean
    NLL. Returns both values ("loss", "ptx_loss": the NLL without the coefficient). pi_old is each
    sample's `old_logprobs` if it carries them, else this forward's own logprobs, detached: under the
    weights that sampled nothing since, they are pi_old, so no separate pass is needed ("mismatch":
    the largest |pi_old - rollout| logprob over the tokens weight version `version` sampled). The loss of
    each micro-batch is its samples' weighted terms; Megatron divides by the number of
    micro-batches and DDP averages over DP, which we undo, so the gradient is exactly that of the
    whole minibatch's loss whatever the layout.
    """
    rank.ddp.train()
    rank.ddp.zero_grad_buffer()
    weights = torch.zeros(len(samples))
    rl = [i for i, s in enumerate(samples) if not s.ptx]
    ptx = [i for i, s in enumerate(samples) if s.ptx]
    if rl:
        weights[rl] = sample_weights([samples[i].group_id for i in rl], [samples[i].trained_tokens for i in rl],
                                     objective.aggregation)
    if ptx:  # token mean over the demonstrations' response tokens
        weights[ptx] = 1.0 / sum(len(samples[i].response_ids) for i in ptx)
    batches = split(rank, samples, weights, version)
    undo = len(batches) * rank.dp

    def loss_func(batch: MicroBatch, logprobs):
        on = lambda t: t.to(logprobs.device)  # noqa: E731
        mask, is_ptx, w, rollout = on(batch.loss_mask), on(batch.ptx), on(batch.weights), on(batch.rollout_logprobs)
        old = torch.where(on(batch.old_given)[:, None] > 0, on(batch.old_logprobs), logprobs.detach())
        terms = sample_losses(objective, logprobs, old, rollout, on(batch.advantages), mask)
        nll = -(logprobs * mask).sum(-1)
        rl_loss = (w * torch.where(is_ptx > 0, 0.0, terms)).sum()
        ptx_loss = (w * torch.where(is_ptx > 0, nll, 0.0)).sum()
        mismatch = ((old - rollout).abs() * on(batch.fresh)).amax()
        return (rl_loss + ptx_coef * ptx_loss) * undo, {"loss": rl_loss.detach(), "ptx_loss": ptx_loss.detach(),
                                                       "mismatch": mismatch}

    outputs = run_schedule(rank, batches, loss_func, forward_only=False)
    totals, mismatch = torch.zeros(2, device=rank.device), torch.zeros((), device=rank.device)
    if rank.last_stage and rank.tp_rank == 0:
        for out in outputs:
            totals += torch.stack([out["loss"], out["ptx_loss"]])
            mismatch = torch.maximum(mismatch, out["mismatch"])
    dist.all_reduce(totals)
    dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
    return {"loss": totals[0].item(), "ptx_loss": totals[1].item(), "mismatch": mismatch.item()}


def grad_norm(rank) -> float:
    """The global L2 norm of the gradients in `main_grad`, over every distinct parameter.

    A parameter counts once: TP-replicated ones on TP rank 0 only, the last stage's copy of tied
    embeddings not at all. Dense squares are summed over TP x PP, expert ones over ETP x EP x PP.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import param_is_not_shared

    dense = torch.zeros((), device=rank.device)
    expert = torch.zeros((), device=rank.device)
    for name, p in rank.model.named_parameters():
        if not param_is_not_shared(p):
            continue
        tp_rank, _, _ = tensor_parallel_of(name)
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq = p.main_grad.float().pow(2).sum()
            if is_expert(name):
                expert += sq
            else:
                dense += sq
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return (dense + expert).sqrt().item()
