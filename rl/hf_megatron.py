"""Conversion between HuggingFace Qwen2/Llama weights and Megatron-core GPT weights, per TP rank.

Megatron layouts (TP = tensor-parallel size, ranks r = 0..TP-1):
- `linear_qkv`: rows grouped by key/value group g: [q heads of g | k of g | v of g]; ranks hold
  contiguous runs of groups.
- `linear_fc1`: each rank holds [gate rows of r | up rows of r].
- column-parallel (`linear_qkv`, `linear_fc1`, `output_layer`, `word_embeddings`) split dim 0;
  row-parallel (`linear_proj`, `linear_fc2`) split dim 1; norms are replicated.
Both directions are pure functions, so the round trip HF -> shards -> HF can be checked exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        )


# Megatron suffix -> HF suffix for tensors that map one-to-one (per layer unless noted).
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_REPLICATED = ("layernorm.weight",)


def _split_dim(megatron_name: str) -> int | None:
    """The dimension a Megatron tensor is sharded along under TP (None: replicated)."""
    if megatron_name.endswith(_REPLICATED):
        return None
    return 1 if megatron_name.endswith(_ROW_PARALLEL) else 0


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


def hf_to_megatron(hf: dict[str, torch.Tensor], g: Geometry, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """The Megatron state dict of TP rank `tp_rank` built from a full HF state dict."""
    full: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
                                     "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not g.tied_embeddings:
        full["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(g.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in _LAYER_DIRECT.items():
            full[m + msuffix] = hf[h + hsuffix]
        attn = h + "self_attn."
        full[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], g)
        if g.qkv_bias:
            full[m + "self_attention.linear_qkv.bias"] = _interleave_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], g)
        # fc1 is [gate_r | up_r] per rank, so it is assembled per rank below.
        full[m + "mlp.linear_fc1.weight"] = torch.stack([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    out = {}
    for name, tensor in full.items():
        if name.endswith("linear_fc1.weight"):
            gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in tensor)
            out[name] = torch.cat([gate, up], dim=0).clone()
            continue
        dim = _split_dim(name)
        out[name] = (tensor if dim is None else tensor.chunk(tp_size, dim=dim)[tp_rank]).clone()
    return out


def megatron_to_hf(shards: list[dict[str, torch.Tensor]], g: Geometry) -> dict[str, torch.Tensor]:
    """A full HF state dict from the Megatron state dicts of all TP ranks (in rank order)."""
    def merged(name: str) -> torch.Tensor:
        dim = _split_dim(name)
        return shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)

    hf = {"model.embed_tokens.weight": merged("embedding.word_embeddings.weight"),
          "model.norm.weight": merged("decoder.final_layernorm.weight")}
    if not g.tied_embeddings:
        hf["lm_head.weight"] = merged("output_layer.weight")
    for i in range(g.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in _LAYER_DIRECT.items():
            hf[h + hsuffix] = merged(m + msuffix)
        attn = h + "self_attn."
        q, k, v = _deinterleave_qkv(merged(m + "self_attention.linear_qkv.weight"), g)
        hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = q, k, v
        if g.qkv_bias:
            q, k, v = _deinterleave_qkv(merged(m + "self_attention.linear_qkv.bias"), g)
            hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"] = q, k, v
        halves = [s[m + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
        hf[h + "mlp.gate_proj.weight"] = torch.cat([gate for gate, _ in halves], dim=0)
        hf[h + "mlp.up_proj.weight"] = torch.cat([up for _, up in halves], dim=0)
    return {k: v.contiguous() for k, v in hf.items()}
