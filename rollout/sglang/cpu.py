"""SGLang's `Engine` on CPU: the settings and import-time stand-ins it needs without CUDA.

Applied only when the rollout device is CPU (`RolloutEngine` calls `apply()` then; on CUDA nothing
here runs). What it does, and why (each measured on our CPU machines; the README's "Running on CPU"):
- `SGLANG_USE_CPU_ENGINE=1`: without it, loading a model on device="cpu" tries to import vllm.
- puts `rollout/sglang/cpu_stubs` first on PYTHONPATH (for this process and the scheduler processes SGLang
  spawns): stand-ins for `sgl_kernel`, `torchvision` and `torchaudio`, which SGLang imports but whose
  CUDA/CPU-mismatched builds cannot load next to CPU torch. Calling a stand-in raises and is logged.
- engine arguments: the torch-native attention backend (no AMX/sgl_kernel here), no CUDA graphs,
  and per-rank OpenMP thread binding when tensor parallel.
- `freeze_gc` in the scheduler processes once the engine is up: SGLang's CPU platform runs a full
  `gc.collect()` on every `flush_cache` (its stand-in for `torch.cuda.empty_cache`), which walked the
  whole heap of a scheduler (everything SGLang imports) in 0.35 s, after every weight push. Frozen
  start-up objects are skipped by the collector, so a flush drops to milliseconds.
- `in_scheduler`, run by SGLang in each of its processes as a plugin (`cpu_stubs/tandem_sglang_cpu-0.dist-info`
  declares it; it is found only while the stand-ins' directory is on the path): the host buffer of the
  routed-experts capturer (`enable_return_routed_experts`, for routing replay) is allocated without
  `cudaHostRegister`, which SGLang calls for it on every device and which fails without CUDA.
"""
from __future__ import annotations

import gc
import os
import sys
import warnings

STUBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs")
FREEZE_GC = "rollout.sglang.cpu.freeze_gc"  # a custom weight loader: runs in every scheduler process
LOADERS = [FREEZE_GC]


def apply() -> None:
    """Prepare this process (and its future children) to run SGLang on CPU. Idempotent."""
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    # SGLang warns at import, in every process, that CUDA-only kernels (AWQ, GGUF, Triton) are absent.
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning"
    warnings.filterwarnings("ignore", category=UserWarning)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if STUBS_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([STUBS_DIR, *paths])
    if STUBS_DIR not in sys.path:
        sys.path.insert(0, STUBS_DIR)


def in_scheduler() -> None:
    """SGLang plugin: host buffers on CPU are plain memory (nothing to pin or register with CUDA)."""
    from sglang.srt.mem_cache.pool_host import common

    def plain(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
        return allocator.allocate(dims, dtype=dtype, device=device)

    common.ALLOC_MEMORY_FUNCS["cpu"] = plain

    from sglang.srt.models.deepseek_common import attention_backend_handler as mla

    mla.AttentionBackendRegistry.register("torch_native", mla._dispatch_mla_subtype)


def engine_kwargs(tp_size: int) -> dict:
    """Extra `sglang.Engine` arguments for CPU."""
    if tp_size > 1:
        cores = os.cpu_count() or tp_size
        per_rank = max(1, cores // tp_size)
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(
            f"{r * per_rank}-{(r + 1) * per_rank - 1}" if per_rank > 1 else str(r) for r in range(tp_size)))
    return {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True}


def freeze_gc(model, named_tensors) -> None:
    """Inside a scheduler: move every object alive now out of the cyclic collector's reach."""
    from rollout.sglang.loader import write_report

    gc.collect()
    gc.freeze()
    write_report(dict(named_tensors), gc.get_freeze_count())


def after_start(engine) -> list[int]:
    """Run `freeze_gc` in each of `engine`'s scheduler processes (through SGLang's weight-update API,
    the one way in; no weights change). Returns how many objects each one froze."""
    from rollout.sglang.loader import run_reporting

    return run_reporting(engine, [], FREEZE_GC)
