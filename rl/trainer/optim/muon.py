"""Optimizers for the Megatron-core training engine: AdamW, and Muon, half of MuonClip (Kimi K2 §2.1;
docs/kimi-methods.md §8). The other half, QK-Clip, is qk_clip.py.

MuonClip is two pieces:
- `Muon`: one torch optimizer whose parameter groups are either Muon groups (hidden 2-D matrices:
  momentum, Newton-Schulz orthogonalisation, update scaled by 0.2 * sqrt(max(n, m)) so its RMS is
  AdamW's, decoupled weight decay) or AdamW groups (embeddings, output layer, norms, biases, MoE router).
  Being a single `torch.optim.Optimizer`, it works with `LambdaLR`, `state_dict()` and `state.clear()`.
- `apply_qk_clip` (qk_clip.py): called after the optimizer step; rescales the query/key weights of attention heads
  whose largest pre-softmax logit in the step's forward passes exceeded tau.

Why our own Muon rather than Megatron's `TensorParallelMuon`: it subclasses `emerging_optimizers`'
`OrthogonalizedOptimizer`, and the only release of that package on PyPI (0.3.0) requires Python >= 3.12,
while this project runs Python 3.11 (megatron-core 0.16.1). Megatron's optimizer wrappers also allocate
on CUDA. The optimizer here is plain torch and collective calls only, so it runs unchanged on CPU/gloo
and CUDA/NCCL.

Tensor parallelism: Newton-Schulz is not separable over row or column blocks, so a TP-sharded matrix is
all-gathered along its `partition_dim`, orthogonalised whole (every rank of the group computes the same
result) and each rank keeps its own slice. Expert weights (Megatron marks them `allreduce=False`) use
the expert tensor-parallel group.

Fused matrices are orthogonalised per logical matrix, as if they were HF's separate projections
(Moonlight/K2 apply Muon to q, k, v, gate and up separately):
- `linear_qkv` (`split_qkv`): rows are grouped per KV group [q heads of the group | k | v]; the q rows of
  all groups form one block, the k rows one and the v rows one. Newton-Schulz commutes with row
  permutations, so each block's result equals that of HF's q_proj / k_proj / v_proj.
- gated `linear_fc1` (`split_fc1`): each TP rank holds [gate_r | up_r]; the gathered matrix is
  [gate_0 | up_0 | gate_1 | up_1 | ...]; gate rows and up rows are orthogonalised as two blocks (HF's
  gate_proj and up_proj). Both flags default to True.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from rl.trainer.sharding import is_expert

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon; used by Moonlight and K2). They trade exact
# convergence for speed: singular values land near 1 (roughly 0.7-1.2), not exactly on it.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# 0.2 * sqrt(max(n, m)) gives an orthogonal update the RMS (0.2) of a typical AdamW update (Moonlight).
MUON_RMS = 0.2

# Parameters that stay on AdamW even when 2-D (K2: embeddings and the output layer; Megatron: router).
_ADAMW_NAMES = re.compile(r"(word_embeddings|position_embeddings|tokentype_embeddings|output_layer|router)\.")
_QKV = re.compile(r"linear_qkv\.weight$")
_FC1 = re.compile(r"linear_fc1\.weight\d*$")
_LEGACY_GROUPED = re.compile(r"experts\.weight[12]$")


def newton_schulz(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T (M = U S V^T) by the quintic Newton-Schulz iteration, in float32."""
    x = matrix.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the side whose Gram matrix is smaller
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def muon_scale(rows: int, cols: int) -> float:
    """Moonlight's factor: an orthogonal rows x cols matrix has RMS 1/sqrt(max); this makes it 0.2."""
    return MUON_RMS * math.sqrt(max(rows, cols))


@dataclass(frozen=True)
class MatrixLayout:
    """How a Muon parameter's local tensor relates to the logical matrices it is orthogonalised as.

    partition_dim/group: the dimension sharded over the tensor-parallel `group` (None: not sharded).
    split_rows: the gathered matrix's rows repeat units of sum(split_rows) rows, [block 0 | block 1 | ...];
    block k is the concatenation of its rows over all units and is orthogonalised on its own.
    Empty: the whole matrix is one block.
    """
    partition_dim: Optional[int] = None
    group: Optional[dist.ProcessGroup] = None
    split_rows: tuple[int, ...] = ()


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon=True` (the default), AdamW on groups with `use_muon=False`.

    Muon (K2 Algorithm 1): M <- mu*M + G;  O = NS(M) (Nesterov: NS(G + mu*M)) * 0.2*sqrt(max(n, m));
    W <- W - lr*(O + wd*W). AdamW is torch's formula. `layouts` maps Muon parameters to their
    `MatrixLayout` (absent: an unsharded, unsplit matrix); it is structure, not state, so it is not
    part of `state_dict()`. Every rank of a tensor-parallel group must step the same parameters.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = False, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, layouts: Optional[dict[torch.Tensor, MatrixLayout]] = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, use_muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon needs 2-D parameters, got shape {tuple(p.shape)}")
        self.layouts = dict(layouts or {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _with_grads(self, group: dict):
        """(param, its gradient in the param's dtype, its optimizer state) for each param that has a grad."""
        for p in group["params"]:
            if p.grad is not None:
                yield p, p.grad.to(p.dtype), self.state[p]

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p, grad, state in self._with_grads(group):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(grad)
            direction = grad.add(buf, alpha=mu) if group["nesterov"] else buf
            update = self.orthogonal_update(p, direction, group["ns_steps"])
            p.mul_(1.0 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)

    def orthogonal_update(self, p: torch.Tensor, direction: torch.Tensor, ns_steps: int = 5) -> torch.Tensor:
        """This rank's slice of the scaled, orthogonalised full matrix (collective over p's TP group)."""
        layout = self.layouts.get(p, MatrixLayout())
        full = _gather(direction, layout.partition_dim, layout.group)
        if layout.split_rows:
            unit = sum(layout.split_rows)
            if full.shape[0] % unit:
                raise ValueError(f"{full.shape[0]} rows do not split into units of {layout.split_rows}")
            units = full.reshape(full.shape[0] // unit, unit, full.shape[1])
            blocks = []
            for block in units.split(list(layout.split_rows), dim=1):
                flat = block.reshape(-1, full.shape[1])
                blocks.append((newton_schulz(flat, ns_steps) * muon_scale(*flat.shape)).reshape(block.shape))
            out = torch.cat(blocks, dim=1).reshape(full.shape)
        else:
            out = newton_schulz(full, ns_steps) * muon_scale(*full.shape)
        return _local_slice(out, layout.partition_dim, layout.group, direction.shape)

    def _adamw_step(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p, grad, state in self._with_grads(group):
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1.0 - lr * wd)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1 ** step))


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def _gather(t: torch.Tensor, dim: Optional[int], group) -> torch.Tensor:
    """The full tensor from the TP shards along `dim` (rank order), or `t` itself when unsharded."""
    size = group_size(group)
    if dim is None or size == 1:
        return t
    front = t.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    dist.all_gather_into_tensor(out, front, group=group)
    return out.movedim(0, dim)


def _local_slice(full: torch.Tensor, dim: Optional[int], group, shape) -> torch.Tensor:
    if dim is None or group_size(group) == 1:
        return full
    length = shape[dim]
    return full.narrow(dim, dist.get_rank(group) * length, length)


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """Muon for hidden 2-D matrices; AdamW for embeddings, output layer, router, norms and biases."""
    return param.ndim == 2 and not _ADAMW_NAMES.search(name)


def _matrix_layout(name: str, param: torch.Tensor, config, split_qkv: bool, split_fc1: bool) -> MatrixLayout:
    from megatron.core import parallel_state as ps

    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if dim is not None and dim < 0:
        dim = None
    group = None
    if dim is not None and ps.model_parallel_is_initialized():
        # Routed experts are split over the expert-TP group (Megatron sets allreduce=False on them only
        # under expert parallelism, hence the name test too; shared experts are dense).
        expert = is_expert(name) or not getattr(param, "allreduce", True)
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    split: tuple[int, ...] = ()
    if split_qkv and _QKV.search(name):
        d = config.kv_channels
        groups = config.num_query_groups or config.num_attention_heads
        split = (config.num_attention_heads // groups * d, d, d)
    elif split_fc1 and _FC1.search(name) and config.gated_linear_unit:
        half = param.shape[0] // 2  # this rank's [gate_r | up_r]; the gathered rows repeat per rank
        split = (half, half)
    return MatrixLayout(partition_dim=dim, group=group, split_rows=split)


def build_optimizer(model_chunks: Iterable[torch.nn.Module], name: str, lr: float, weight_decay: float = 0.0,
                    adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                    muon_momentum: float = 0.95, muon_nesterov: bool = False, ns_steps: int = 5,
                    split_qkv: bool = True, split_fc1: bool = True) -> torch.optim.Optimizer:
    """The training engine's optimizer over the trainable parameters of `model_chunks`.

    "adamw": torch AdamW over every parameter. "muon": `Muon` with one Muon group (hidden matrices,
    see `is_muon_param`) and one AdamW group, sharing lr and weight decay (Moonlight's RMS matching
    is what lets them share the lr). Grads are read from `p.grad`.
    """
    chunks = list(model_chunks)
    named = [(n, p, c) for c in chunks for n, p in c.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW([p for _, p, _ in named], lr=lr, weight_decay=weight_decay,
                                 betas=tuple(adam_betas), eps=adam_eps)
    if name != "muon":
        raise ValueError(f"unknown optimizer {name!r} (expected 'adamw' or 'muon')")
    muon, adamw, layouts = [], [], {}
    for n, p, chunk in named:
        if _LEGACY_GROUPED.search(n):
            raise NotImplementedError(f"{n}: legacy GroupedMLP fuses all local experts into one matrix; "
                                      "Muon needs one matrix per expert (use SequentialMLP or TE grouped experts)")
        if is_muon_param(n, p):
            muon.append(p)
            layouts[p] = _matrix_layout(n, p, chunk.config, split_qkv, split_fc1)
        else:
            adamw.append(p)
    groups = [g for g in (dict(params=muon, use_muon=True), dict(params=adamw, use_muon=False)) if g["params"]]
    return Muon(groups, lr=lr, weight_decay=weight_decay, momentum=muon_momentum, nesterov=muon_nesterov,
                ns_steps=ns_steps, betas=adam_betas, eps=adam_eps, layouts=layouts)


# --- QK-Clip ------------------------------------------------------------------------------------------
