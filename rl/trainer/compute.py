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

from rl.algo.mismatch import SUMMED, correction_keep, mismatch_sums
from rl.algo.objectives import ObjectiveSettings, sample_losses, sample_weights
from rl.sample import Sample
from rl.trainer import routing
from rl.trainer.micro_batches import MicroBatch, split_micro_batches
from rl.trainer.response_logits import labels_for, logprobs_from_logits, logprobs_from_loss
from rl.trainer.sharding import is_expert, tensor_parallel_of


def run_schedule(rank, batches: list[MicroBatch], loss_func, forward_only: bool, record_routing: bool = False
                 ) -> list[dict]:
    """Megatron's forward(-backward) schedule (1F1B under PP) over this rank's micro-batches;
    `loss_func(batch, logprobs)` gets each micro-batch's per-token logprobs [rows, width - 1] of the
    next tokens at each row's temperature (zeros before its first response-predicting position).

    MoE: each forward replays the micro-batch's `replay` routing; after it, the micro-batch holds
    `routing_diff` (where its experts differ from the rollout engine's, on this rank's layers: when it
    carries `rollout_routing`, as compute_gradients' micro-batches do) and, with
    `record_routing`, `used` (the experts it chose): partial on each rank, see `complete_routing`."""
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
        sp = _sequence_slice(rank)
        if rank.moe:
            routing.set_targets(rank.routers, batch.replay, *sp)
        output = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels)
        if rank.moe and batch.rollout_routing is not None:
            batch.routing_diff = routing.differs(rank.routers, batch.rollout_routing, *sp)
        if rank.moe and record_routing:
            rows, width = tokens.shape
            batch.used = routing.used_routing(rank.routers, rows, width, rank.hf_config.num_hidden_layers,
                                              rank.model.config.moe_router_topk, *sp)
        return output, partial(with_logprobs, batch, first)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[rank.ddp],
        num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=forward_only)


def _sequence_slice(rank) -> tuple[int, int]:
    """(this rank's slice, slices) of each sequence its MoE routers see: TP's under sequence parallelism."""
    if rank.model.config.sequence_parallel:
        return rank.tp_rank, rank.layout.tensor_parallel_size
    return 0, 1


def complete_routing(rank, part: torch.Tensor) -> torch.Tensor:
    """A routing tensor filled on each rank for its own layers and sequence slice (-1 or 0 elsewhere),
    made whole on every rank of the model-parallel group."""
    from megatron.core import parallel_state as ps

    whole = part.to(rank.device)
    dist.all_reduce(whole, op=dist.ReduceOp.MAX, group=ps.get_model_parallel_group())
    return whole.cpu()


def split(rank, samples: list[Sample], weights: Optional[torch.Tensor] = None,
          version: Optional[int] = None, replay: Optional[list] = None,
          compare_routing: bool = False) -> list[MicroBatch]:
    return split_micro_batches(samples, weights, rank.dp, rank.dp_rank, rank.micro_batch_tokens,
                               width_multiple=rank.layout.tensor_parallel_size,
                               uniform=rank.layout.pipeline_parallel_size > 1, version=version, replay=replay,
                               compare_routing=compare_routing)


@torch.no_grad()
def compute_logprobs(rank, samples: list[Sample], record_routing: bool = False,
                     replay: Optional[list] = None) -> list[list[float]]:
    """Per-response-token logprobs of each sample under the current weights, at the sample's
    sampling temperature (on every rank). MoE: `replay` (per sample, [positions, layers, topk] or None)
    the experts to route to; `record_routing`: keep the experts each input position was routed to, per
    sample, in `rank.recorded_routing` (R2's source)."""
    rank.ddp.eval()
    batches = split(rank, samples, replay=replay)
    record_routing = record_routing and rank.moe

    def collect(batch: MicroBatch, logprobs):
        return logprobs.new_zeros(()), {"index": batch.index, "logprobs": logprobs.cpu()}

    found: dict[int, list[float]] = {}
    for out in run_schedule(rank, batches, collect, forward_only=True, record_routing=record_routing):
        for row, i in enumerate(out["index"].tolist()):
            if i >= 0:
                s = samples[i]
                found[i] = out["logprobs"][row, len(s.prompt_ids) - 1 : len(s.tokens) - 1].tolist()
    routes: dict[int, object] = {}
    for batch in batches if record_routing else ():
        used = complete_routing(rank, batch.used)
        routes.update({i: used[row, :len(samples[i].tokens) - 1].numpy().astype("int16")
                       for row, i in enumerate(batch.index.tolist()) if i >= 0})
    lead = rank.last_stage and rank.tp_rank == 0
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (found, routes) if lead else ({}, {}))
    for part, part_routes in everyone:
        found.update(part)
        routes.update(part_routes)
    rank.recorded_routing = [routes.get(i) for i in range(len(samples))] if record_routing else None
    return [found[i] for i in range(len(samples))]


def compute_gradients(rank, samples: list[Sample], objective: ObjectiveSettings,
                      ptx_coef: float = 0.0, version: Optional[int] = None,
                      replay: Optional[list] = None) -> dict[str, float]:
    """Forward and backward over `samples` (one minibatch): DP-reduced grads in `main_grad`.

    Rollouts get the objective, PTX demonstrations (`Sample.ptx`) `ptx_coef` times their token-mean
    NLL. Returns both values ("loss", "ptx_loss": the NLL without the coefficient) and the mismatch
    measures (rl/algo/mismatch.py) over the tokens weight version `version` sampled. pi_old is each
    sample's `old_logprobs` if it carries them, else this forward's own logprobs, detached: under the
    weights that sampled nothing since, they are pi_old, so no separate pass is needed. MoE: the forward
    replays the rollout engine's experts with `routing_replay: rollout`, else `replay` (per sample; R2).
    The loss of each micro-batch is its samples' weighted terms; Megatron divides by the number of
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
    if objective.routing_replay == "rollout":
        replay = [s.routed_experts for s in samples]
    elif objective.routing_replay == "off":
        replay = None
    batches = split(rank, samples, weights, version, replay, compare_routing=rank.moe)
    undo = len(batches) * rank.dp

    def loss_func(batch: MicroBatch, logprobs):
        on = lambda t: t.to(logprobs.device)  # noqa: E731
        mask, is_ptx, w, rollout = on(batch.loss_mask), on(batch.ptx), on(batch.weights), on(batch.rollout_logprobs)
        old = torch.where(on(batch.old_given)[:, None] > 0, on(batch.old_logprobs), logprobs.detach())
        terms = sample_losses(objective, logprobs, old, rollout, on(batch.advantages), mask)
        nll = -(logprobs * mask).sum(-1)
        rl_loss = (w * torch.where(is_ptx > 0, 0.0, terms)).sum()
        ptx_loss = (w * torch.where(is_ptx > 0, nll, 0.0)).sum()
        sums = mismatch_sums(old, rollout, on(batch.fresh) * (1 - is_ptx)[:, None],
                             correction_keep(old, rollout, mask, objective), objective.tis_cap)
        return (rl_loss + ptx_coef * ptx_loss) * undo, {"loss": rl_loss.detach(), "ptx_loss": ptx_loss.detach(),
                                                       **sums}

    outputs = run_schedule(rank, batches, loss_func, forward_only=False)
    keys = ("loss", "ptx_loss", *SUMMED, "routing_diff", "routed_tokens")
    totals, largest = torch.zeros(len(keys), device=rank.device), torch.zeros((), device=rank.device)
    lead = rank.last_stage and rank.tp_rank == 0
    if lead:
        for out in outputs:
            totals[:len(keys) - 2] += torch.stack([out[k] for k in keys[:-2]])
            largest = torch.maximum(largest, out["abs_max"])
    if rank.moe:
        for batch in (b for b in batches if b.rollout_routing is not None):
            diff = complete_routing(rank, batch.routing_diff)[:, :-1].float()
            routed = batch.fresh * (1 - batch.ptx)[:, None] * (batch.rollout_routing[:, :-1, :, 0] >= 0).any(-1)
            if lead:
                totals[-2:] += torch.stack([(diff * routed).sum(), routed.sum()]).to(rank.device)
    dist.all_reduce(totals)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    sums = dict(zip(keys, totals.tolist()), abs_max=largest.item())
    return {"loss": sums["loss"], "ptx_loss": sums["ptx_loss"], "sums": sums}


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
