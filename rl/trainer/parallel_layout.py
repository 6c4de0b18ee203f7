"""How a world of training processes is divided: tensor (TP), pipeline (PP), expert (EP) and data (DP)
parallelism, checked against the model's shape before any process group exists.

Megatron's order is tp-cp-ep-dp-pp: DP = world / (TP * PP), and expert parallelism is carved out of the
data-parallel ranks (experts are split over EP ranks that see different data), so EP must divide DP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world or model; the message names the setting."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_parallel_size * self.pipeline_parallel_size)

    def check(self, num_layers: int, num_heads: int, num_kv_heads: int, num_experts: Optional[int] = None,
              latent_attention: bool = False, prefix: str = "trainer.") -> "ParallelLayout":
        """Raise LayoutError naming the first setting that does not fit; return self otherwise."""
        tp, pp, ep, world = (self.tensor_parallel_size, self.pipeline_parallel_size,
                             self.expert_parallel_size, self.world_size)
        for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp),
                            ("expert_parallel_size", ep), ("world_size", world)):
            if value < 1:
                raise LayoutError(f"{prefix}{name}: must be >= 1 (got {value})")
        if world % (tp * pp):
            raise LayoutError(f"{prefix}world_size: must be a multiple of tensor_parallel_size * "
                              f"pipeline_parallel_size = {tp * pp} (got {world})")
        if num_heads % tp:
            raise LayoutError(f"{prefix}tensor_parallel_size: must divide the {num_heads} attention heads (got {tp})")
        if num_kv_heads % tp:
            raise LayoutError(f"{prefix}tensor_parallel_size: must divide the {num_kv_heads} key/value heads (got {tp})")
        if latent_attention and tp > 1:
            # Megatron's local (non-TE) MLA shards the key/value down-projection by columns, and the
            # gradient of the rotary key it shares across heads is then not summed over TP ranks:
            # measured ~0.5% off in every upstream gradient. TE's spec duplicates that projection.
            raise LayoutError(f"{prefix}tensor_parallel_size: multi-latent attention needs Transformer Engine "
                              f"for TP > 1 (the local spec's rotary-key gradient is not reduced over TP) (got {tp})")
        if pp > num_layers:
            raise LayoutError(f"{prefix}pipeline_parallel_size: larger than the {num_layers} layers (got {pp})")
        if num_layers % pp:
            raise LayoutError(f"{prefix}pipeline_parallel_size: must divide the {num_layers} layers (got {pp})")
        if ep > 1 and not num_experts:
            raise LayoutError(f"{prefix}expert_parallel_size: the model has no experts (got {ep})")
        if num_experts and num_experts % ep:
            raise LayoutError(f"{prefix}expert_parallel_size: must divide the {num_experts} experts (got {ep})")
        if self.data_parallel_size % ep:
            raise LayoutError(f"{prefix}expert_parallel_size: must divide the data-parallel size "
                              f"{self.data_parallel_size} = world / (TP * PP) (got {ep})")
        return self


def model_shape(hf_config) -> dict:
    """The numbers a layout is checked against, read from an HF config (dense, MoE or MLA)."""
    heads = hf_config.num_attention_heads
    experts = (getattr(hf_config, "n_routed_experts", None) or getattr(hf_config, "num_experts", None)
               or getattr(hf_config, "num_local_experts", None))
    return dict(num_layers=hf_config.num_hidden_layers, num_heads=heads,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, num_experts=experts,
                latent_attention=getattr(hf_config, "kv_lora_rank", None) is not None)
