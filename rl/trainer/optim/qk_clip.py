"""QK-Clip, the second half of MuonClip (Kimi K2 §2.1; docs/kimi-methods.md §8): after each optimizer
step, the query and key weights of every attention head whose largest pre-softmax logit in the step's
forward passes exceeded tau are scaled down, so attention logits stay bounded. Megatron records each
head's max logit when `TransformerConfig.qk_clip` is on; the step's maximum is reduced over data
parallelism first, so every replica clips the same heads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rl.trainer.optim.muon import group_size


def _attention_layers(model_chunks) -> list:
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, (SelfAttention, MLASelfAttention))]


def reset_max_attn_logits(model_chunks) -> None:
    """Forget the max logits recorded so far (e.g. by evaluation passes before the training step)."""
    for layer in _attention_layers(model_chunks):
        if hasattr(layer.core_attention, "current_max_attn_logits"):
            layer.core_attention.current_max_attn_logits = None


def apply_qk_clip(model_chunks, dp_group=None) -> float:
    """QK-Clip after the optimizer step; returns the largest recorded attention logit.

    Each layer's per-head maxima (recorded by the core attention during this step's forward passes
    when `config.qk_clip or config.log_max_attention_logit`) are all-reduced with MAX over `dp_group`
    (default: Megatron's data-parallel group with context parallelism). When `config.qk_clip`, heads
    over `config.qk_clip_threshold` (tau) are rescaled; the records are then cleared either way.
    The returned maximum covers this rank's layers and heads (reduce it over the model-parallel group
    for a global metric). Collective: every rank of `dp_group` must call it.

    The rule is Megatron's (alpha = `config.qk_clip_alpha`, 0.5 in K2):
    - standard attention with GQA: K2 states QK-Clip for multi-head attention (per head h,
      gamma_h = min(1, tau / S_max^h), W_q^h and W_k^h each scaled by sqrt(gamma_h)) and for MLA, not for
      GQA. With GQA the key is shared by the group's query heads, so Megatron clips per KV group:
      eta_g = min(1, tau / max_{h in g} S_max^h); every query head of group g is scaled by eta_g^alpha
      and the shared key by eta_g^(1 - alpha). Each logit of the group scales by eta_g, so the group's
      maximum lands on tau; query heads of the group that were under tau are scaled too, and other groups
      are untouched. With one head per group this is exactly the paper's MHA rule. We use it. Query and
      key biases (Qwen2) are scaled with their weights, so the logits scale exactly (Megatron scales
      weights only). Implemented here because Megatron 0.16.1's `SelfAttention.clip_qk` reshapes the
      fused QKV weight with the global (not per-partition) projection sizes and fails when TP > 1.
    - MLA: Megatron's `MLASelfAttention.clip_qk` (per head: q_nope by gamma^alpha, q_rope by gamma,
      k_nope by gamma^(1-alpha), the shared rotary key untouched), which is the paper's MLA rule.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    layers = [m for m in _attention_layers(model_chunks)
              if getattr(m.core_attention, "current_max_attn_logits", None) is not None]
    if not layers:
        return 0.0
    records = [m.core_attention.current_max_attn_logits for m in layers]
    stacked = torch.cat([r.detach().float().reshape(-1) for r in records])
    if dp_group is None and ps.model_parallel_is_initialized():
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    if group_size(dp_group) > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=dp_group)
    max_logit = stacked.max().item()
    with torch.no_grad():
        for layer, record, part in zip(layers, records, stacked.split([r.numel() for r in records])):
            config = layer.config
            if config.qk_clip and isinstance(layer, MLASelfAttention):
                layer.core_attention.current_max_attn_logits = part.to(record.dtype).view(record.shape)
                layer.clip_qk()  # Megatron's MLA rule; resets the record
            elif config.qk_clip:
                _clip_grouped_qkv(layer, part)
            layer.core_attention.current_max_attn_logits = None
    return max_logit


def _clip_grouped_qkv(layer, head_max: torch.Tensor) -> None:
    """Megatron's per-KV-group rule on this partition's fused QKV weight (and bias), see `apply_qk_clip`."""
    config = layer.config
    if getattr(config, "qk_layernorm", False):
        raise ValueError("QK-Clip rescales W_q/W_k, which a q/k layernorm would undo: not supported with qk_layernorm")
    if config.num_query_groups < group_size(layer.tp_group):
        raise NotImplementedError("QK-Clip with fewer KV groups than tensor-parallel ranks (replicated keys)")
    groups = layer.num_query_groups_per_partition
    heads = layer.num_attention_heads_per_partition
    if head_max.numel() != heads:
        raise ValueError(f"expected {heads} recorded head maxima, got {head_max.numel()}")
    group_max = head_max.view(groups, heads // groups).amax(dim=1)
    if not bool((group_max > config.qk_clip_threshold).any()):
        return
    eta = torch.clamp(config.qk_clip_threshold / group_max, max=1.0)
    d = layer.hidden_size_per_attention_head
    q_rows = heads // groups * d
    q_scale = eta.pow(config.qk_clip_alpha)
    k_scale = eta.pow(1.0 - config.qk_clip_alpha)
    for param in (layer.linear_qkv.weight, getattr(layer.linear_qkv, "bias", None)):
        if param is None:
            continue
        for tensor in (param.data, getattr(param, "main_param", None)):
            if tensor is None:
                continue
            per_group = tensor.view(groups, q_rows + 2 * d, -1)
            scale = lambda s: s.to(tensor.dtype).view(groups, 1, 1)  # noqa: E731
            per_group[:, :q_rows].mul_(scale(q_scale))
            per_group[:, q_rows:q_rows + d].mul_(scale(k_scale))
