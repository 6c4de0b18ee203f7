"""Conversion between HuggingFace Qwen2/Llama weights and the full (unsharded) Megatron-core GPT state.

Megatron's layouts, before `rl.trainer.sharding` splits them per rank:
- `linear_qkv`: rows grouped by key/value group g: [q heads of g | k of g | v of g], so a TP rank's
  contiguous slice holds whole groups;
- `linear_fc1`: [gate; up] (a TP rank holds [gate_r; up_r]).
Both directions are pure functions, so the round trip HF -> full -> HF can be checked exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Geometry:
    """The shape facts conversion needs, read from an HF config."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys before RoPE

    @classmethod
    def from_hf(cls, hf_config) -> "Geometry":
        heads = hf_config.num_attention_heads
        return cls(
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=hf_config.model_type in QK_NORM_MODEL_TYPES,
        )

    def direct(self) -> dict[str, str]:
        """Megatron suffix -> HF suffix of the per-layer tensors that map one-to-one."""
        return {**_LAYER_DIRECT, **(_QK_NORM if self.qk_norm else {})}


QK_NORM_MODEL_TYPES = ("qwen3",)


# Megatron suffix -> HF suffix for tensors that map one-to-one (per layer unless noted).
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QK_NORM = {"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"}


def _interleave_qkv(q, k, v, g: Geometry) -> torch.Tensor:
    per_group = g.num_heads // g.num_kv_heads
    q = q.reshape(g.num_kv_heads, per_group * g.head_dim, *q.shape[1:])
    k = k.reshape(g.num_kv_heads, g.head_dim, *k.shape[1:])
    v = v.reshape(g.num_kv_heads, g.head_dim, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _deinterleave_qkv(qkv, g: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = g.num_heads // g.num_kv_heads
    grouped = qkv.reshape(g.num_kv_heads, (per_group + 2) * g.head_dim, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * g.head_dim, g.head_dim, g.head_dim], dim=1)
    return (t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))  # type: ignore[return-value]


def hf_to_full(hf: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
    """The full Megatron state dict built from an HF state dict."""
    full: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
                                     "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not g.tied_embeddings:
        full["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(g.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in g.direct().items():
            full[m + msuffix] = hf[h + hsuffix]
        attn = h + "self_attn."
        for kind in ("weight", "bias") if g.qkv_bias else ("weight",):
            full[m + f"self_attention.linear_qkv.{kind}"] = _interleave_qkv(
                hf[attn + f"q_proj.{kind}"], hf[attn + f"k_proj.{kind}"], hf[attn + f"v_proj.{kind}"], g)
        full[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    return full


def full_to_hf_rules(g: Geometry) -> dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """Megatron full-state name -> the function giving its HF tensors. Each HF tensor comes from exactly
    one Megatron tensor, so any subset of the full state converts on its own (the weight sync streams)."""
    rules: dict[str, Callable] = {"embedding.word_embeddings.weight": lambda t: {"model.embed_tokens.weight": t},
                                  "decoder.final_layernorm.weight": lambda t: {"model.norm.weight": t}}
    if not g.tied_embeddings:
        rules["output_layer.weight"] = lambda t: {"lm_head.weight": t}
    for i in range(g.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in g.direct().items():
            rules[m + msuffix] = lambda t, name=h + hsuffix: {name: t}
        attn = h + "self_attn."
        for kind in ("weight", "bias") if g.qkv_bias else ("weight",):
            names = [attn + f"{p}_proj.{kind}" for p in "qkv"]
            rules[m + f"self_attention.linear_qkv.{kind}"] = (
                lambda t, names=names: dict(zip(names, _deinterleave_qkv(t, g))))
        rules[m + "mlp.linear_fc1.weight"] = (
            lambda t, names=(h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"): dict(zip(names, t.chunk(2))))
    return rules


def apply_rules(rules: dict[str, Callable], full: dict[str, torch.Tensor], partial: bool) -> dict[str, torch.Tensor]:
    """HF tensors from the full-state tensors present; without `partial`, every rule's tensor must be."""
    if not partial:
        missing = [k for k in rules if k not in full]
        if missing:
            raise KeyError(f"full state lacks {missing[:5]} ({len(missing)} in all)")
    hf: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        if key in rules:
            hf.update(rules[key](tensor))
    return {k: v.contiguous() for k, v in hf.items()}


def full_to_hf(full: dict[str, torch.Tensor], g: Geometry, partial: bool = False) -> dict[str, torch.Tensor]:
    """An HF state dict from the full Megatron state dict (or from any subset of it, with `partial`)."""
    return apply_rules(full_to_hf_rules(g), full, partial)
