"""Setting a trainer rank up: its device, its process groups (Megatron's parallel state), its seed,
the HF weights it starts from, and the learning-rate schedule."""
from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from checkpoint_engine.group import tcp_store
from rl.trainer.parallel_layout import ParallelLayout


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(layout: ParallelLayout, rank: int, master_addr: str, master_port: int, device: str,
                     timeout_s: float, seed: int) -> None:
    """This rank's default process group (gloo on CPU, NCCL on CUDA) and Megatron's parallel groups."""
    from megatron.core import parallel_state

    if device == "cpu":
        from rl.trainer import megatron_cpu

        megatron_cpu.patch_current_device()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) if layout.world_size > 1 else 0)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # the store rank 0 hosts listens on loopback only when the ranks meet there (a single-node run)
        store = tcp_store(master_addr, master_port, layout.world_size, rank == 0, timeout)
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl", store=store, rank=rank,
                                world_size=layout.world_size, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_parallel_size,
            expert_model_parallel_size=layout.expert_parallel_size,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    torch.manual_seed(seed)
    if device != "cpu":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


def lr_factor(step: int, warmup: int, decay: str, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then constant or cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
