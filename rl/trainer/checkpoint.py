"""Checkpoints of the training engine: a resharding-capable distributed save/load (the HF export is
export.py).

Distributed checkpoint (`save_checkpoint` / `load_checkpoint`), with Megatron's `dist_checkpointing`
(torch_dist format):
- Model: each chunk's `sharded_state_dict()`, which names every tensor by its global key, shape and
  offset (TP split, global layer number, global expert number), so a checkpoint written under one
  parallel layout loads under another wherever Megatron can reshard (TP, PP, EP, DP changes).
- Optimizer: a plain torch optimizer (or anything with the same surface: `param_groups`, `state_dict`,
  `load_state_dict`). Every per-parameter state tensor of the parameter's shape (Adam's `exp_avg` and
  `exp_avg_sq`, Muon's momentum, ...) is saved as a sharded tensor laid out exactly like its parameter
  (Megatron's `make_sharded_optimizer_tensor`), under the key `optimizer.state.<name>.<param key>`, so it
  reshards with it. Scalar per-parameter state (Adam's `step`) goes to the common state, keyed by the
  parameter's sharded key (so it too survives a layout change; the parts of one key must agree) and
  gathered from every rank, since a pipeline stage knows only its own parameters; so do the param
  groups' hyper-parameters (lr, betas, initial_lr, ...), matched by group order. Loading needs no
  optimizer state to exist yet: the state names present are read from the checkpoint's metadata.
- Extra state: a caller's dict (step counter, scheduler state, data position) plus this rank's RNG
  states, in one small file per rank. RNG is restored only when the world size is unchanged.
- A marker file written last tells complete checkpoints from interrupted ones.

CPU: Megatron's default torch_dist save strategy stages tensors with `torch.cuda.synchronize()` and
writes from forked helper processes fed through a spawned multiprocessing manager; without CUDA it fails.
On CPU we save with `SyncTorchDistSaveStrategy`, which writes the same torch_dist format synchronously
with `torch.distributed.checkpoint`'s standard `FileSystemWriter` and Megatron's own save planner.
Loading uses Megatron's default strategy on every device.
"""
from __future__ import annotations

import copy
import json
import os
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

MARKER = "tandem_checkpoint.json"
STATE_PREFIX = "optimizer.state."
_COMMON_OPTIMIZER = "optimizer_common"
_SHARDED_OPTIMIZER = "optimizer_state"


# --- save strategy usable without CUDA -------------------------------------------------------------
def _sync_save_strategy():
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        """torch_dist format written synchronously by the standard writer (no CUDA, no helper processes)."""

        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                       flatten_state_dict=False)
            dcp_save(pyt_state_dict, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=planner)

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def _save_strategy(device: torch.device, sync_writer: Optional[bool]):
    """Megatron's default writer (None) on CUDA, ours without CUDA or when asked for."""
    if sync_writer is None:
        sync_writer = device.type != "cuda"
    return _sync_save_strategy() if sync_writer else None


# --- model -----------------------------------------------------------------------------------------
def unwrap(module):
    """The bare model inside DDP / Float16Module-style wrappers (they keep it at `.module`)."""
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


def _chunk_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"  # Megatron's own naming of virtual-pipeline chunks


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    chunks = [unwrap(m) for m in model_chunks]
    return {_chunk_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}


def _sharded_by_param(model_sd: dict) -> dict[int, Any]:
    """id(Parameter) -> its ShardedTensor / ShardedTensorFactory (Megatron keeps the Parameter as `.data`)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    return {id(t.data): t for t in nested_values(tensors)}


# --- optimizer -------------------------------------------------------------------------------------
def _indexed_params(optimizer) -> list[tuple[int, torch.nn.Parameter]]:
    """(state_dict index, param) for every param, in the optimizer's own `state_dict()` indexing."""
    groups = optimizer.state_dict()["param_groups"]
    return [(idx, p) for live, saved in zip(optimizer.param_groups, groups)
            for idx, p in zip(saved["params"], live["params"])]


def _is_moment(value, param) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    return a == b


def optimizer_sharded_state_dict(model_sd: dict, optimizer) -> tuple[dict, dict]:
    """The optimizer's state sharded like the model's parameters: (sharded tensors, scalar state).

    The scalar state maps each parameter's sharded key to its non-tensor / 0-dim state ({"step": 3});
    parameters sharing a key (the layers stacked under one key, the TP shards of one tensor) must agree.
    Local to this rank: `save_checkpoint` merges it over ranks.
    """
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    by_param = _sharded_by_param(model_sd)
    state = optimizer.state_dict()["state"]
    sharded: dict[str, dict] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param in _indexed_params(optimizer):
        if idx not in state:
            continue
        sh = by_param.get(id(param))
        if sh is None:
            raise ValueError(f"an optimizer parameter of shape {tuple(param.shape)} is not in the model's "
                             "sharded state dict (pass every model chunk the optimizer steps)")
        for name, value in state[idx].items():
            if _is_moment(value, param):
                sharded.setdefault(str(idx), {})[name] = make_sharded_optimizer_tensor(
                    sh, value.detach(), prefix=STATE_PREFIX + name)
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                raise NotImplementedError(f"optimizer state {name!r} of shape {tuple(value.shape)} is neither "
                                          f"scalar nor shaped like its parameter {tuple(param.shape)}")
            else:
                value = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
                _merge_scalar(scalars.setdefault(sh.key, {}), name, value, sh.key)
    return sharded, scalars


def _merge_scalar(into: dict, name: str, value, key: str) -> None:
    if name in into and not _same(into[name], value):
        raise ValueError(f"optimizer state {name!r} differs between parts of {key}; only a shared value "
                         "can be checkpointed")
    into[name] = value


def _gather_scalars(local: dict[str, dict]) -> dict[str, dict]:
    """Union of every rank's scalar state (a pipeline stage only knows its own parameters)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    merged: dict[str, dict] = {}
    for part in everyone:
        for key, entries in part.items():
            for name, value in entries.items():
                _merge_scalar(merged.setdefault(key, {}), name, value, key)
    return merged


def _optimizer_load_targets(model_sd: dict, optimizer, checkpoint_dir: str) -> dict:
    """Sharded tensors to load each param's saved state into (names read from the checkpoint metadata)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    names_by_key: dict[str, dict[str, torch.dtype]] = {}
    for key, meta in dist_checkpointing.load_tensors_metadata(checkpoint_dir).items():
        if key.startswith(STATE_PREFIX):
            name, param_key = key[len(STATE_PREFIX):].split(".", 1)
            names_by_key.setdefault(param_key, {})[name] = meta.dtype
    by_param = _sharded_by_param(model_sd)
    targets: dict[str, dict] = {}
    for idx, param in _indexed_params(optimizer):
        sh = by_param.get(id(param))
        if sh is None:
            continue
        for name, dtype in names_by_key.get(sh.key, {}).items():
            buffer = torch.empty(param.shape, dtype=dtype, device=param.device)
            targets.setdefault(str(idx), {})[name] = make_sharded_optimizer_tensor(sh, buffer, STATE_PREFIX + name)
    return targets


def _restore_optimizer(param_keys: dict[int, str], optimizer, loaded: dict, common: dict) -> None:
    """Rebuild a torch-format optimizer state dict from the loaded tensors and call `load_state_dict`."""
    current = optimizer.state_dict()
    saved_groups = common["param_groups"]
    if len(saved_groups) != len(current["param_groups"]):
        raise ValueError(f"checkpoint has {len(saved_groups)} optimizer param groups, the optimizer "
                         f"{len(current['param_groups'])}")
    groups = [{**saved, "params": live["params"]} for saved, live in zip(saved_groups, current["param_groups"])]
    state = {}
    for idx, param in _indexed_params(optimizer):
        tensors = loaded.get(str(idx))
        if not tensors:
            continue
        entry = {name: t.to(param.device) for name, t in tensors.items()}
        for name, value in common["scalar_state"].get(param_keys[id(param)], {}).items():
            entry[name] = copy.deepcopy(value)  # each param owns its counter (Adam increments it in place)
        state[idx] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's random generators: python, numpy, torch CPU, and CUDA (+ Megatron's tracker)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        try:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised: nothing to save
            pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
        if "megatron_tracker" in state:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# --- save / load -----------------------------------------------------------------------------------
def _extra_path(path: str, rank: int) -> str:
    return os.path.join(path, f"extra_rank{rank:05d}.pt")


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "expert_parallel": ps.get_expert_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def save_checkpoint(path: str, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    extra: Optional[dict] = None, sync_writer: Optional[bool] = None) -> None:
    """Collective: every rank calls it with its own chunks, optimizer and extra dict.

    `path` must not hold a checkpoint yet. Writes the model and optimizer shards, one extra-state file
    per rank (the dict given plus this rank's RNG states), then the marker file. `sync_writer`: write
    with `SyncTorchDistSaveStrategy` (default: only without CUDA).
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if os.path.exists(os.path.join(path, MARKER)):
        raise FileExistsError(f"{path} already holds a checkpoint")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    model_sd = model_sharded_state_dict(model_chunks)
    state = dict(model_sd)
    if optimizer is not None:
        sharded, scalars = optimizer_sharded_state_dict(model_sd, optimizer)
        state[_SHARDED_OPTIMIZER] = sharded
        state[_COMMON_OPTIMIZER] = {"scalar_state": _gather_scalars(scalars),
                                    "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                     for g in optimizer.param_groups]}
    device = next(p.device for m in model_chunks for p in m.parameters())
    dist_checkpointing.save(state, path, sharded_strategy=_save_strategy(device, sync_writer))
    torch.save({"world_size": dist.get_world_size(), "extra": extra or {}, "rng": rng_state()},
               _extra_path(path, rank))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump({"format": 1, "layout": _layout(), "has_optimizer": optimizer is not None}, f)
    dist.barrier()


def load_checkpoint(path: str, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    restore_rng: bool = True) -> dict:
    """Collective: load model (and optimizer) state saved by `save_checkpoint`, under any layout Megatron
    can reshard to. Returns the extra dict (this rank's, or rank 0's if this rank did not exist then).
    """
    if not os.path.exists(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(model_chunks)
    request = dict(model_sd)
    if optimizer is not None:
        request[_SHARDED_OPTIMIZER] = _optimizer_load_targets(model_sd, optimizer, path)
        param_keys = {pid: sh.key for pid, sh in _sharded_by_param(model_sd).items()}  # before load alters it
    loaded = dist_checkpointing.load(request, path)
    chunks = [unwrap(m) for m in model_chunks]
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_chunk_key(i, len(chunks))], strict=True)
    if optimizer is not None:
        if _COMMON_OPTIMIZER not in loaded:
            raise ValueError(f"{path} holds no optimizer state")
        _restore_optimizer(param_keys, optimizer, loaded.get(_SHARDED_OPTIMIZER, {}), loaded[_COMMON_OPTIMIZER])
    rank = dist.get_rank()
    own = _extra_path(path, rank)
    saved = torch.load(own if os.path.exists(own) else _extra_path(path, 0), weights_only=False)
    if restore_rng and os.path.exists(own) and saved["world_size"] == dist.get_world_size():
        set_rng_state(saved["rng"])
    return saved["extra"]
