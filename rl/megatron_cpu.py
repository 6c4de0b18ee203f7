"""Megatron-core on CPU: the two accommodations its GPT forward/backward needs without CUDA.

Applied only when the training device is CPU (see `TrainingEngine`); on CUDA nothing here runs.

1. Megatron's local `DotProductAttention` takes a scratch buffer from a CUDA memory pool and forks the
   CUDA RNG tracker. The layer spec is a `ModuleSpec`, so we substitute `SDPACoreAttention`, a core
   attention built on `torch.nn.functional.scaled_dot_product_attention` with the same interface.
2. The rotary embedding (and a few other places) move tensors to `torch.cuda.current_device()`.
   `patch_current_device` makes that call answer "cpu" in this process.
3. megatron-core 0.16.1 references `moe_utils.te_general_gemm` even without Transformer Engine;
   defining it as None lets MoE layers build.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

_patched = False


def patch_current_device() -> None:
    """Make `torch.cuda.current_device()` return "cpu" in this (CPU-only) process. Idempotent."""
    global _patched
    if _patched:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu.patch_current_device must not run where CUDA is available")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _patched = True


class SDPACoreAttention(MegatronModule):
    """Causal core attention on `scaled_dot_product_attention`, in Megatron's tensor layout.

    Input: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng key/value groups on this TP rank).
    Output: [sq, b, np * hn]. Padding is on the right only, so a causal mask is sufficient.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        heads, groups = query.shape[2], key.shape[2]
        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, np, s, hn]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * query.shape[3])


def cpu_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a GPT layer spec whose core attention is `SDPACoreAttention`."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
