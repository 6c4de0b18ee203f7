"""Between the "full" Megatron state dict (TP=PP=EP=1 names and shapes) and one rank's shard of it.

The full state is what `rl.trainer.models.dense` converts to and from HF. Where a tensor lives on this rank is
read from the live model, so every architecture Megatron builds is covered by the same rules:
- pipeline stage: local `decoder.layers.{i}` is global layer `layers[i].layer_number - 1`;
- expert parallelism: local `experts.local_experts.{j}` is global expert `ep_rank * num_local + j`;
- tensor parallelism: parameters Megatron marks `tensor_model_parallel` are split along their
  `partition_dim` (expert weights over the expert-TP group); gated `linear_fc1` holds [gate_r | up_r];
- vocabulary: embedding and output rows are padded with zeros to Megatron's padded vocab size;
- tied embeddings under PP: the last stage's `output_layer.weight` is a copy of the word embeddings.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def is_expert(name: str) -> bool:
    """Routed-expert tensors (split over EP, and over the expert-TP group under TP)."""
    return ".experts." in name


def _is_glu(name: str, model) -> bool:
    return bool(model.config.gated_linear_unit) and re.search(r"linear_fc1\.(weight|bias)$", name) is not None


def tensor_parallel_of(name: str):
    """(rank, size, group) of the tensor-parallel group that splits this tensor."""
    from megatron.core import parallel_state as ps

    if is_expert(name):
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def global_name(local: str, model) -> str:
    """The full-state name of a local state-dict entry (global layer and expert numbers)."""
    from megatron.core import parallel_state as ps

    match = _LAYER.match(local)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        local = f"decoder.layers.{layer.layer_number - 1}." + local[match.end():]
    match = _EXPERT.search(local)
    if match:
        # every MoE layer holds the same number of local experts
        per_rank = next(layer.mlp.experts.num_local_experts for layer in model.decoder.layers
                        if hasattr(layer.mlp, "experts"))
        offset = ps.get_expert_model_parallel_rank() * per_rank
        local = local[: match.start()] + f".experts.local_experts.{offset + int(match.group(1))}." + local[match.end():]
    return local


def _split(full: torch.Tensor, dim: Optional[int], rank: int, size: int, glu: bool) -> torch.Tensor:
    if dim is None or size == 1:
        return full
    if glu:
        return torch.cat([half.chunk(size, dim=dim)[rank] for half in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def _merge(parts: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if glu:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _partition_dim(tensor) -> Optional[int]:
    return tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None


def _source(global_key: str, tied: bool) -> str:
    return EMBEDDING if (global_key == OUTPUT and tied) else global_key


def _pad_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def load_full_state(model, full: dict[str, torch.Tensor], padded_vocab: int) -> None:
    """Copy this rank's shard of `full` into `model` (strict: every parameter and buffer is set)."""
    tied = model.share_embeddings_and_output_weights
    local = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    missing = [k for k in local if _source(global_name(k, model), tied) not in full]
    if missing:
        raise RuntimeError(f"full state lacks tensors for {missing[:5]} ({len(missing)} in all)")
    with torch.no_grad():
        for name, target in local.items():
            tensor = full[_source(global_name(name, model), tied)]
            if name in (EMBEDDING, OUTPUT):
                tensor = _pad_vocab(tensor, padded_vocab)
            rank, size, _ = tensor_parallel_of(name)
            shard = _split(tensor, _partition_dim(target), rank, size, _is_glu(name, model))
            if shard.shape != target.shape:
                raise RuntimeError(f"{name}: shard shape {tuple(shard.shape)} != model shape {tuple(target.shape)}")
            target.copy_(shard)


def gather_full_state(model, vocab_size: int, dst: int = 0, grads: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The full state (CPU tensors, unpadded vocab) on global rank `dst`; None on other ranks.

    With `grads`, the parameters' DDP gradients (`main_grad`) in the same layout instead (buffers,
    such as a router's expert bias, have none: zeros stand in for them).
    Collective over the whole world: every rank must call it.
    """
    from megatron.core import parallel_state as ps

    tied = model.share_embeddings_and_output_weights
    mine: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        rank, size, group = tensor_parallel_of(name)
        dim = _partition_dim(tensor)
        full = tensor.detach()
        if grads:
            full = tensor.main_grad if isinstance(tensor, torch.nn.Parameter) else torch.zeros_like(full)
        if dim is not None and size > 1:
            parts = [torch.empty_like(full) for _ in range(size)]
            dist.all_gather(parts, full.contiguous(), group=group)
            full = _merge(parts, dim, _is_glu(name, model))
        key = global_name(name, model)
        if tied and key == OUTPUT:
            continue  # the last stage's copy of the embeddings
        replica = ps.get_expert_data_parallel_rank() if is_expert(name) else ps.get_data_parallel_rank()
        if rank == 0 and replica == 0:
            # a copy: on CPU `.cpu()` would alias the live parameter, which the next step changes
            mine[key] = (full[:vocab_size] if key in (EMBEDDING, OUTPUT) else full).to("cpu", copy=True)
    if dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, gathered, dst=dst)
    if gathered is None:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return out
