"""Which Megatron model and which HF conversion each HF architecture uses, chosen by `model_type`
(a registry: `register_architecture` adds a family).

An `Architecture` supplies: its `TransformerConfig` class and fields, the layer (or block) spec with the
CPU substitutions when the device is CPU, whether it needs sequence parallelism under TP, and the two
pure conversions between an HF state dict and the full Megatron state dict (`rl.trainer.sharding`
does the per-rank split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.functional as F

from rl.trainer.models import moe as moe
from rl.trainer.models.dense import Geometry, full_to_hf, hf_to_full


def _dense_config_kwargs(hf) -> dict:
    g = Geometry.from_hf(hf)
    return dict(num_layers=g.num_layers, hidden_size=hf.hidden_size, num_attention_heads=g.num_heads,
                num_query_groups=g.num_kv_heads, kv_channels=g.head_dim, ffn_hidden_size=hf.intermediate_size,
                normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
                activation_func=F.silu, add_bias_linear=False, add_qkv_bias=g.qkv_bias, qk_layernorm=g.qk_norm)


def _dense_layer_spec(hf, device: str, config=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=Geometry.from_hf(hf).qk_norm)
    if device == "cpu":
        from rl.trainer.megatron_cpu import cpu_block_spec

        spec = cpu_block_spec(spec)
    return spec


def _transformer_config(hf):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig


@dataclass(frozen=True)
class Architecture:
    """One model family behind the interface the trainer builds and converts models through."""
    name: str
    config_class: Callable[[Any], type]  # hf config -> the TransformerConfig class (MLA has its own)
    transformer_config_kwargs: Callable[[Any], dict]  # hf config -> that class's architecture fields
    layer_spec: Callable[..., Any]  # (hf config, device, config) -> the layer or block spec
    needs_sequence_parallel: bool  # under TP (Megatron's MoE layer trains only with it)
    hf_to_full: Callable[[dict, Any], dict]  # (HF state dict, hf config) -> full Megatron state dict
    full_to_hf: Callable[..., dict]  # (full Megatron state, hf config, partial=False) -> HF state dict


ARCHITECTURES: dict[str, Architecture] = {}  # by HF `model_type`


def register_architecture(architecture: Architecture, *model_types: str) -> Architecture:
    """Make `model_types` (HF `config.model_type` values) train with `architecture`."""
    for model_type in model_types:
        ARCHITECTURES[model_type] = architecture
    return architecture


DENSE = Architecture(
    name="dense",
    config_class=_transformer_config,
    transformer_config_kwargs=_dense_config_kwargs,
    layer_spec=_dense_layer_spec,
    needs_sequence_parallel=False,
    hf_to_full=lambda state, hf: hf_to_full(state, Geometry.from_hf(hf)),
    full_to_hf=lambda full, hf, partial=False: full_to_hf(full, Geometry.from_hf(hf), partial),
)

# Qwen3-MoE and DeepSeek-V3 / Kimi K2 (MLA + routed and shared experts). Megatron's MoE layer refuses
# to train under TP without sequence parallelism.
MOE = Architecture(
    name="moe",
    config_class=moe.transformer_config_class,
    transformer_config_kwargs=moe.megatron_arch_kwargs,
    layer_spec=moe.layer_spec,
    needs_sequence_parallel=True,
    hf_to_full=moe.hf_to_full,
    full_to_hf=moe.full_to_hf,
)

register_architecture(DENSE, "qwen2", "llama", "qwen3")
register_architecture(MOE, "qwen3_moe", "deepseek_v3", "kimi_k2")


def for_config(hf_config) -> Architecture:
    try:
        return ARCHITECTURES[hf_config.model_type]
    except KeyError:
        raise ValueError(f"model.path: unsupported architecture {hf_config.model_type!r} "
                         f"(supported: {sorted(ARCHITECTURES)})") from None


def gpt_model_kwargs(hf, vocab_size: int, pre_process: bool, post_process: bool) -> dict:
    """`GPTModel` arguments besides config and spec, for any architecture above."""
    return dict(moe.gpt_model_kwargs(hf), vocab_size=vocab_size, pre_process=pre_process, post_process=post_process)
