"""Which part of each HF tensor an SGLang tensor-parallel rank holds, so a weight push can deliver each
rollout rank only that part (the checkpoint engine's reduce_scatter transport with per-TP-rank receivers).

The rules mirror SGLang's own sharding for the dense decoder layers (Llama, Qwen2, Qwen3, and the
attention of Qwen3-MoE): column-parallel projections split their output rows evenly, row-parallel ones their input
columns, and the vocabulary-parallel embedding and LM head split the padded vocabulary (the last rank's
rows stop at the real vocabulary). Anything else (norms, routers, experts, MLA projections, unlisted
architectures) travels whole: the engine's loader still receives a full tensor and shards it itself,
which is always correct, only not minimal.

A region is what SGLang's weight loader narrows the full tensor to on that rank; the loader
(`rollout.sglang.loader.load_bucket`) rebuilds a full-shape tensor around it, so SGLang's own
`load_weights` (name mapping, fused qkv / gate_up, padding) does the rest.
"""
from __future__ import annotations

from typing import Callable, Optional

from checkpoint_engine.buckets import Region, TensorMeta

SGLANG_VOCAB_PADDING = 64  # sglang.srt.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE
SHARDED_MODEL_TYPES = {"llama", "qwen2", "qwen3", "qwen3_moe"}
COLUMN_PARALLEL = (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")  # weight and bias: rows
ROW_PARALLEL = (".o_proj.weight", ".down_proj.weight")  # input columns (their biases are not split)
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


def vocab_rows(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """[start, end) of the real vocabulary rows that SGLang's vocabulary-parallel layers keep on a rank:
    the vocabulary is padded to a multiple of 64 (of 64 * TP when that does not split evenly), each rank
    takes an equal share of the padded rows, and padding rows are not loaded."""
    padding = SGLANG_VOCAB_PADDING
    if -(-vocab_size // padding) * padding % tp_size:
        padding *= tp_size
    per_rank = -(-vocab_size // padding) * padding // tp_size
    start = tp_rank * per_rank
    return min(start, vocab_size), min(start + per_rank, vocab_size)


def _even(meta: TensorMeta, dim: int, tp_size: int) -> list[Region]:
    full = meta.shape[dim]
    if full % tp_size:
        raise ValueError(f"{meta.name}: dimension {dim} ({full}) does not split over {tp_size} rollout TP ranks")
    part = full // tp_size
    return [Region(dim, r * part, part, full) for r in range(tp_size)]


def region_rule(hf_config, tp_size: int) -> Callable[[TensorMeta], list[Optional[Region]]]:
    """For each HF tensor, one region per rollout TP rank (None: the whole tensor)."""
    sharded = tp_size > 1 and hf_config.model_type in SHARDED_MODEL_TYPES

    def regions(meta: TensorMeta) -> list[Optional[Region]]:
        name = meta.name
        if not sharded or "expert" in name:
            return [None] * tp_size
        if name in VOCAB_PARALLEL:
            bounds = [vocab_rows(meta.shape[0], r, tp_size) for r in range(tp_size)]
            return [Region(0, start, end - start, meta.shape[0]) for start, end in bounds]
        if any(p in name for p in COLUMN_PARALLEL):
            return _even(meta, 0, tp_size)
        if name.endswith(ROW_PARALLEL):
            return _even(meta, 1, tp_size)
        return [None] * tp_size
    return regions
