"""A trainer rank's side of a weight push: which HF tensors it provides, produced bucket by bucket.

Each local Megatron tensor (a "unit") converts on its own to one or more HF tensors (the conversions
are per tensor, see `rl.trainer.models.dense.full_to_hf_rules`), so a push streams: for each bucket only the
units it needs are gathered and converted, and the whole model is never materialised a second time.

Two ways a rank provides a unit (data-parallel replicas other than the first provide nothing):
- whole (broadcast, colocated): its tensor-parallel shards are all-gathered onto TP rank 0, the
  owner, which converts it; the other TP ranks only take part in the gather;
- placed (reduce_scatter): every TP rank converts a full-shape tensor holding its own shard and zeros
  elsewhere; the reduce-scatter's sum assembles the tensor, so the trainers do no gather at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from checkpoint_engine.buckets import TensorMeta, dtype_name
from rl.trainer.sharding import EMBEDDING, OUTPUT, _is_glu, _merge, _partition_dim, global_name, is_expert, tensor_parallel_of


@dataclass
class Unit:
    key: str  # full-state (global) Megatron name
    tensor: torch.Tensor  # the live local parameter or buffer
    dim: Optional[int]  # tensor-parallel partition dim, None when replicated
    tp_rank: int
    tp_size: int
    tp_group: object
    glu: bool
    full_shape: tuple[int, ...]
    order: int  # position in the local state dict: TP peers gather in the same order

    @property
    def owner(self) -> bool:
        return self.tp_rank == 0


def _replica_rank(name: str) -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_data_parallel_rank() if is_expert(name) else ps.get_data_parallel_rank()


class WeightExport:
    def __init__(self, model, arch, hf_config, vocab_size: int):
        self.arch, self.hf_config, self.vocab_size = arch, hf_config, vocab_size
        self.units: dict[str, Unit] = {}  # HF name -> the unit it comes from
        self.metas: dict[str, TensorMeta] = {}
        tied = model.share_embeddings_and_output_weights
        for order, (local, tensor) in enumerate(model.state_dict(keep_vars=True).items()):
            key = global_name(local, model)
            if local.endswith("_extra_state") or (tied and key == OUTPUT) or _replica_rank(local) != 0:
                continue
            rank, size, group = tensor_parallel_of(local)
            dim = _partition_dim(tensor)
            shape = list(tensor.shape)
            if dim is not None:
                shape[dim] *= size
            if key in (EMBEDDING, OUTPUT):
                shape[0] = vocab_size
            unit = Unit(key, tensor, dim, rank, size, group, _is_glu(local, model), tuple(shape), order)
            probe = torch.empty(shape, dtype=tensor.dtype, device="meta")
            for name, hf in arch.full_to_hf({key: probe}, hf_config, partial=True).items():
                self.units[name] = unit
                self.metas[name] = TensorMeta(name, dtype_name(hf.dtype), tuple(hf.shape))

    def provided(self, placed: bool) -> list[TensorMeta]:
        """HF tensors this rank puts in a push: owned whole ones, or every one it has a shard of."""
        return [m for name, m in self.metas.items() if placed or self.units[name].owner]

    def _whole(self, unit: Unit) -> Optional[torch.Tensor]:
        full = unit.tensor.detach()
        if unit.dim is not None and unit.tp_size > 1:
            parts = [torch.empty_like(full) for _ in range(unit.tp_size)]
            dist.all_gather(parts, full.contiguous(), group=unit.tp_group)
            full = _merge(parts, unit.dim, unit.glu)
        return full if unit.owner else None

    def _placed(self, unit: Unit) -> Optional[torch.Tensor]:
        shard = unit.tensor.detach()
        if unit.dim is None or unit.tp_size == 1:
            return shard if unit.owner else None  # replicated: one contribution, not tp_size of them
        padded = list(shard.shape)
        padded[unit.dim] *= unit.tp_size
        full = shard.new_zeros(padded)
        halves = zip(full.chunk(2, unit.dim), shard.chunk(2, unit.dim)) if unit.glu else [(full, shard)]
        for whole, part in halves:
            width = part.shape[unit.dim]
            whole.narrow(unit.dim, unit.tp_rank * width, width).copy_(part)
        return full

    def produce(self, names: list[str], placed: bool) -> dict[str, torch.Tensor]:
        """This rank's HF tensors among `names` (collective over TP groups when not `placed`)."""
        units = sorted({id(self.units[n]): self.units[n] for n in names if n in self.units}.values(),
                       key=lambda u: u.order)
        out: dict[str, torch.Tensor] = {}
        for unit in units:
            full = self._placed(unit) if placed else self._whole(unit)
            if full is None:
                continue
            if unit.key in (EMBEDDING, OUTPUT):
                full = full[:self.vocab_size]
            out.update(self.arch.full_to_hf({unit.key: full}, self.hf_config, partial=True))
        return {n: out[n] for n in names if n in out}
