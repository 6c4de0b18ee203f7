"""Move the training engine's state to host memory between phases and bring it back (Kimi K2 §3.3.2).

While the rollout engines generate, the colocated trainer's parameters, gradients and optimizer state
sit in host memory; bringing the trainer up again is a host-to-device copy. We work on *storages*, not
tensors: a device storage is copied into a host buffer and then shrunk with `untyped_storage().resize_(0)`,
and on the way back it is grown to its old size and refilled. Every tensor object that views the
storage (a `Parameter`, its `.grad`, Megatron DDP's `main_grad` views into one contiguous grad buffer,
the optimizer's `exp_avg`) stays the same Python object with the same shape, strides and offset, so the
optimizer's state keys, DDP's hooks and bucket views all remain valid. Megatron's own
`offload_grad_buffers` uses the same trick but drops the gradient values; we keep them, so an
offload/onload cycle is exactly invisible to training.

On CUDA the host buffers are pinned and reused across cycles; on CPU the same code runs with plain host
buffers (the "device" storage is still released and refilled, so the path is tested without a GPU).
Nothing may read or write the moved tensors while they are offloaded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

CATEGORIES = ("params", "grads", "optimizer")


@dataclass
class OffloadReport:
    """What one `offload`/`onload` call did: bytes copied per category and device bytes held."""
    direction: str
    moved_bytes: dict[str, int]
    device_bytes_before: dict[str, int]
    device_bytes_after: dict[str, int]
    cuda_allocated_before: Optional[int] = None
    cuda_allocated_after: Optional[int] = None
    seconds: float = 0.0

    @property
    def total_moved(self) -> int:
        return sum(self.moved_bytes.values())


@dataclass
class _Moved:
    category: str
    storage: torch.UntypedStorage  # the device storage, now of size 0; every view still points at it
    nbytes: int
    host: torch.Tensor  # uint8 host copy
    discard: bool = False  # refill with zeros instead of the host copy


@dataclass
class _Pool:
    """Host buffers per category, reused in order when the sizes match (the common case)."""
    buffers: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def take(self, category: str, index: int, nbytes: int, pin: bool) -> torch.Tensor:
        bufs = self.buffers.setdefault(category, [])
        if index < len(bufs) and bufs[index].numel() == nbytes:
            return bufs[index]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if index < len(bufs):
            bufs[index] = buf
        else:
            bufs.append(buf)
        return buf


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage (a transient handle for copying)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _ddp_buffers(modules: Iterable) -> list:
    """Megatron DDP's `_ParamAndGradBuffer`s (dense and expert) of any wrappers among `modules`."""
    found = []
    for m in modules:
        while m is not None:
            bufs = getattr(m, "buffers", None)
            if isinstance(bufs, list):  # Megatron DDP shadows nn.Module.buffers() with a list
                found += bufs + list(getattr(m, "expert_parallel_buffers", []) or [])
            inner = getattr(m, "module", None)
            m = inner if isinstance(inner, torch.nn.Module) else None
    return found


def _optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    tensors = []
    for optim in optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]:
        if optim is None:
            continue
        for per_param in optim.state.values():
            values = per_param.values() if isinstance(per_param, dict) else [per_param]
            tensors += [v for v in values if isinstance(v, torch.Tensor)]
    return tensors


class Offloader:
    """Moves the storages of a model's params, grads and optimizer state to host memory and back.

    `modules`: the model chunks (bare modules or Megatron DDP wrappers, whose grad buffers are then
    included); `optimizer`: a torch-style optimizer (anything with `.state`: param -> dict of tensors) or
    a list of them; `ddp`: extra DDP wrappers, if the chunks given are the bare modules.
    The set of tensors is collected afresh at each `offload`, so state created or replaced since the
    last cycle (a reset optimizer, new `.grad`s) is handled.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], optimizer=None, ddp: Sequence = (),
                 device: Optional[torch.device | str] = None, empty_cache: bool = True):
        self.modules = list(modules)
        self.optimizer = optimizer
        self.ddp = list(ddp)
        if device is None:
            device = next(p.device for m in self.modules for p in m.parameters())
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.empty_cache = empty_cache
        self._moved: list[_Moved] = []
        self._pool = _Pool()

    # --- what is managed ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, list[torch.Tensor]]:
        params = [p for m in self.modules for p in m.parameters()]
        grads = []
        for p in params:
            for name in ("grad", "main_grad"):
                g = getattr(p, name, None)
                if isinstance(g, torch.Tensor):
                    grads.append(g)
        for buf in _ddp_buffers(self.modules + self.ddp):
            if getattr(buf, "param_data", None) is not None:
                params.append(buf.param_data)
            if getattr(buf, "grad_data", None) is not None:
                grads.append(buf.grad_data)
        return {"params": params, "grads": grads, "optimizer": _optimizer_state_tensors(self.optimizer)}

    def _storages(self) -> dict[str, list[torch.UntypedStorage]]:
        """Unique device storages per category; a storage shared by two categories counts in the first."""
        seen, out = set(), {c: [] for c in CATEGORIES}
        for category, tensors in self._tensors().items():
            for t in tensors:
                if t.device != self.device:
                    continue  # e.g. Adam's `step` counters, which torch keeps on the CPU next to CUDA params
                storage = t.untyped_storage()
                key = storage._cdata  # identity of the underlying StorageImpl (stable across resizes)
                if key not in seen:
                    seen.add(key)
                    out[category].append(storage)
        return out

    def device_bytes(self) -> dict[str, int]:
        """Bytes each category holds on the training device now (sum of its storages' sizes)."""
        return {c: sum(s.nbytes() for s in storages) for c, storages in self._storages().items()}

    @property
    def is_offloaded(self) -> bool:
        return bool(self._moved)

    # --- moving ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None

    @torch.no_grad()
    def offload(self, categories: Sequence[str] = CATEGORIES, discard_grads: bool = False) -> OffloadReport:
        """Copy the device storages of `categories` to host memory and release them on the device.

        `discard_grads`: free gradient storage without copying it; `onload` refills it with zeros (what
        Megatron's `offload_grad_buffers` does). Storages already offloaded are left alone, so calling
        this twice is harmless.
        """
        start, allocated = time.perf_counter(), self._allocated()
        storages = self._storages()
        fixed = [s for c in categories for s in storages[c] if s.nbytes() and not s.resizable()]
        if fixed:  # e.g. tensors memory-mapped from a file: release them some other way
            raise RuntimeError(f"{len(fixed)} storage(s) cannot be resized; nothing was offloaded")
        before = {c: sum(s.nbytes() for s in v) for c, v in storages.items()}
        moved = {c: 0 for c in CATEGORIES}
        new: list[_Moved] = []
        for category in categories:
            index = len([m for m in self._moved if m.category == category and not m.discard])
            for storage in storages[category]:
                nbytes = storage.nbytes()
                if nbytes == 0:
                    continue  # already offloaded (or empty)
                discard = discard_grads and category == "grads"
                host = (torch.empty(0, dtype=torch.uint8) if discard
                        else self._pool.take(category, index, nbytes, self.pin))
                if not discard:
                    host.copy_(_bytes_of(storage), non_blocking=self.pin)
                    index += 1
                    moved[category] += nbytes
                new.append(_Moved(category, storage, nbytes, host, discard))
        self._sync()  # the copies must land before their source memory is released
        for m in new:
            m.storage.resize_(0)
        self._moved += new
        if self.device.type == "cuda" and self.empty_cache:
            torch.cuda.empty_cache()
        return OffloadReport("offload", moved, before, self.device_bytes(), allocated, self._allocated(),
                             time.perf_counter() - start)

    @torch.no_grad()
    def onload(self, categories: Sequence[str] = CATEGORIES) -> OffloadReport:
        """Re-allocate the released device storages and copy their contents back (harmless if none)."""
        start, allocated = time.perf_counter(), self._allocated()
        before = self.device_bytes()
        moved = {c: 0 for c in CATEGORIES}
        keep = []
        for m in self._moved:
            if m.category not in categories:
                keep.append(m)
                continue
            m.storage.resize_(m.nbytes)
            target = _bytes_of(m.storage)
            if m.discard:
                target.zero_()
            else:
                target.copy_(m.host, non_blocking=self.pin)
                moved[m.category] += m.nbytes
        self._sync()
        self._moved = keep
        return OffloadReport("onload", moved, before, self.device_bytes(), allocated, self._allocated(),
                             time.perf_counter() - start)

    def host_bytes(self) -> int:
        """Host memory held by the reusable buffers."""
        return sum(b.numel() for bufs in self._pool.buffers.values() for b in bufs)
