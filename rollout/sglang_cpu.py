"""SGLang's `Engine` on CPU: the settings and import-time stand-ins it needs without CUDA.

Applied only when the rollout device is CPU (`RolloutEngine` calls `apply()` then; on CUDA nothing
here runs). What it does, and why (measured in ../shared/notes/cpu-stack.md):
- `SGLANG_USE_CPU_ENGINE=1`: without it, loading a model on device="cpu" tries to import vllm.
- puts `rollout/cpu_stubs` first on PYTHONPATH (for this process and the scheduler processes SGLang
  spawns): stand-ins for `sgl_kernel`, `torchvision` and `torchaudio`, which SGLang imports but whose
  CUDA/CPU-mismatched builds cannot load next to CPU torch. Calling a stand-in raises and is logged.
- engine arguments: the torch-native attention backend (no AMX/sgl_kernel here), no CUDA graphs,
  and per-rank OpenMP thread binding when tensor parallel.
"""
from __future__ import annotations

import os
import sys
import warnings

STUBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_stubs")


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


def engine_kwargs(tp_size: int) -> dict:
    """Extra `sglang.Engine` arguments for CPU."""
    if tp_size > 1:
        cores = os.cpu_count() or tp_size
        per_rank = max(1, cores // tp_size)
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(
            f"{r * per_rank}-{(r + 1) * per_rank - 1}" if per_rank > 1 else str(r) for r in range(tp_size)))
    return {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True}
