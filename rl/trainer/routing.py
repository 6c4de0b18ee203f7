"""MoE routing in the trainer: replaying given experts per token, and keeping the experts each forward used.

Megatron-core's router calls its `RouterReplay` (`moe_enable_routing_replay`, one per MoE layer) for the
top-k of every token. `ReplayRouter` is that class with two changes: a token whose experts are not
given (NOT_ROUTED: a padding position, a token the rollout engine never routed) is routed as usual instead of
failing, and the experts actually used are kept, which the routing-difference metric and R2's
recording read (rl/trainer/compute.py).

Routing tensors here are [rows, width, layers, topk] in a micro-batch's token layout (layers: the model's
global layer numbers, dense layers included, as SGLang reports them); the router sees its tokens in
Megatron's [sequence, batch] order, and under sequence parallelism only its rank's slice of the sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay

from rl.sample import NOT_ROUTED


class ReplayRouter(RouterReplay):
    """Replays the experts given per token where known, routes the rest; keeps what it used (`used`)."""

    def __init__(self):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # held by its router, not by a global list
        self.used: Optional[torch.Tensor] = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, experts = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        target = self.target_topk_idx
        if target is not None:
            target = target.to(scores.device, experts.dtype)
            experts = torch.where(target[:, :1] >= 0, target, experts)
            probs = scores.gather(1, experts)  # the router's own scores for the replayed experts: gradients flow
        self.used = experts.detach()
        return probs, experts


def install(model) -> dict[int, ReplayRouter]:
    """A `ReplayRouter` in each MoE layer of this rank's `model` (a GPTModel built with
    `moe_enable_routing_replay`), by global layer index (0-based); empty for a dense model."""
    routers: dict[int, ReplayRouter] = {}
    for layer in model.decoder.layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is None or not hasattr(router, "router_replay"):
            continue
        if router.router_replay in RouterReplay.global_router_replay_instances:
            RouterReplay.global_router_replay_instances.remove(router.router_replay)
        router.router_replay = routers[layer.layer_number - 1] = ReplayRouter()
    return routers


def _local(routing: torch.Tensor, sp_rank: int, sp_size: int) -> torch.Tensor:
    """[rows, width, ...] -> this rank's [width / sp_size, rows, ...] slice in Megatron's order."""
    t = routing.transpose(0, 1)
    part = t.shape[0] // sp_size
    return t[sp_rank * part:(sp_rank + 1) * part]


def set_targets(routers: dict[int, ReplayRouter], routing: Optional[torch.Tensor], sp_rank: int, sp_size: int):
    """Before a forward: replay `routing` ([rows, width, layers, topk], NOT_ROUTED where not given; None: route)."""
    for layer, router in routers.items():
        router.used = None
        router.target_topk_idx = None if routing is None else \
            _local(routing[:, :, layer], sp_rank, sp_size).reshape(-1, routing.shape[-1])


def used_routing(routers: dict[int, ReplayRouter], rows: int, width: int, layers: int, topk: int,
                 sp_rank: int, sp_size: int) -> torch.Tensor:
    """After a forward: the experts it used, [rows, width, layers, topk], NOT_ROUTED outside this rank's
    layers and sequence slice (a MAX all-reduce over the model-parallel group completes it)."""
    out = torch.full((width, rows, layers, topk), NOT_ROUTED, dtype=torch.int32)
    part = width // sp_size
    for layer, router in routers.items():
        if router.used is not None:
            out[sp_rank * part:(sp_rank + 1) * part, :, layer] = router.used.view(part, rows, topk).cpu().to(torch.int32)
    return out.transpose(0, 1).contiguous()


def differs(routers: dict[int, ReplayRouter], reference: torch.Tensor, sp_rank: int, sp_size: int) -> torch.Tensor:
    """After a forward: 1 at each [row, position] whose experts (as a set) differ from `reference`'s in
    any of this rank's MoE layers, where the reference is known; 0 elsewhere ([rows, width])."""
    rows, width = reference.shape[:2]
    out = torch.zeros(width, rows, dtype=torch.int32)
    part = width // sp_size
    for layer, router in routers.items():
        if router.used is None:
            continue
        want = _local(reference[:, :, layer], sp_rank, sp_size)  # [part, rows, topk]
        got = router.used.view(part, rows, -1).cpu().to(want.dtype)
        diff = (want.sort(-1).values != got.sort(-1).values).any(-1) & (want[..., 0] >= 0)
        out[sp_rank * part:(sp_rank + 1) * part] |= diff.to(torch.int32)
    return out.transpose(0, 1).contiguous()
