"""Weight loaders that run inside SGLang's model workers (registered as SGLang `custom_weight_loader`s).

`load_bucket` is how a checkpoint-engine bucket reaches the model without a copy through the
tokenizer process: the request carries only a small descriptor (an IPC handle of the bucket buffer:
shared memory on CPU, CUDA IPC on GPU, plus the tensors' names, dtypes, shapes and offsets); each
worker maps the buffer, views the tensors in place and hands them to the model's own `load_weights`,
which shards them for its tensor-parallel rank. With per-TP-rank receivers each rank maps its own
buffer, which holds only its shard of the split tensors.

`reseed` seeds the workers' generators at the start of every RL step (see `RolloutEngine.reseed`).

`verify_weights` is the optional full check: it reloads the trainer's tensors through the same
`load_weights` and reports every parameter whose bytes changed, i.e. that differed after the push.
Loader exceptions would kill SGLang's worker, so it reports through a file instead of raising.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import tempfile

import torch

BUCKET_KEY = "tandem.bucket"
REPORT_KEY = "tandem.verify_report"
LOAD_BUCKET = "rollout.sglang.loader.load_bucket"
VERIFY_WEIGHTS = "rollout.sglang.loader.verify_weights"
RESEED = "rollout.sglang.loader.reseed"
WORKER_SETTINGS = "rollout.sglang.loader.worker_settings"
SEED_KEY = "tandem.seed"
LOADERS = [LOAD_BUCKET, VERIFY_WEIGHTS, RESEED, WORKER_SETTINGS]


def encode_bucket(shards: list[tuple[bytes, list[tuple]]]) -> torch.Tensor:
    """A bucket descriptor as the uint8 tensor SGLang's weight-update request can carry: one
    (IPC handle, tensors) per TP rank, or a single one that every rank reads
    (`checkpoint_engine.endpoint.shard_descriptor`)."""
    blob = pickle.dumps({"shards": shards})
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


_scratch: dict[str, torch.Tensor] = {}  # per device: room to rebuild full-shape tensors around shards


def _scratch_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    buf = _scratch.get(str(device))
    if buf is None or buf.numel() < nbytes:
        buf = _scratch[str(device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf[:nbytes]


def _full_shape(shape, region) -> tuple[int, ...]:
    dim, _start, full = region
    return tuple(full if d == dim else n for d, n in enumerate(shape))


def _decode(tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """This worker's tensors, viewed in the sender's buffer. A tensor that arrived as this rank's region
    only is placed into a full-shape tensor whose other entries are never read: SGLang's loader narrows
    every full tensor to exactly that region (`rollout.sglang.tp_shards`)."""
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.utils.common import MultiprocessingSerializer

    shards = pickle.loads(tensor.cpu().numpy().tobytes())["shards"]  # our own descriptor: str/int/bytes
    # the TP rank as SGLang itself picks each rank's payload of a weight-update request
    handle, tensors = shards[get_parallel().tp_rank] if len(shards) > 1 else shards[0]
    buffer = MultiprocessingSerializer.deserialize(handle)  # SGLang's allow-listed unpickler
    views = []
    for name, dtype, shape, offset, region in tensors:
        dt = getattr(torch, dtype)
        views.append((name, buffer[offset:offset + dt.itemsize * math.prod(shape)].view(dt).view(shape), region))
    sizes = [v.element_size() * math.prod(_full_shape(v.shape, r)) for _, v, r in views if r is not None]
    scratch, used, out = _scratch_bytes(sum(-(-n // 64) * 64 for n in sizes), buffer.device), 0, []
    for name, view, region in views:
        if region is not None:
            shape = _full_shape(view.shape, region)
            nbytes = view.element_size() * math.prod(shape)
            full = scratch[used:used + nbytes].view(view.dtype).view(shape)
            used += -(-nbytes // 64) * 64
            full.narrow(region[0], region[1], view.shape[region[0]]).copy_(view)
            view = full
        out.append((name, view))
    return out


def load_bucket(model, named_tensors) -> None:
    for key, tensor in named_tensors:
        if key != BUCKET_KEY:
            raise ValueError(f"load_bucket expects {BUCKET_KEY!r} entries, got {key!r}")
        model.load_weights(_decode(tensor))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def encode_report_path(path: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.encode()), dtype=torch.uint8)


def write_report(named_tensors: dict[str, torch.Tensor], report) -> None:
    """In a worker: write `report` (JSON) where the caller of `run_reporting` reads it."""
    report_dir = bytes(named_tensors.pop(REPORT_KEY).cpu().numpy()).decode()
    with open(os.path.join(report_dir, f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


def run_loader(engine, named_tensors: list[tuple[str, torch.Tensor]], load_format: str) -> None:
    """Run the custom loader `load_format` in every worker of an SGLang `engine`, inside the
    weight-update session SGLang requires."""
    engine.begin_weight_update()
    try:
        ok, message = engine.update_weights_from_tensor(named_tensors, load_format=load_format, flush_cache=False)
    finally:
        engine.end_weight_update()
    if not ok:
        raise RuntimeError(f"SGLang could not run {load_format}: {message}")


def run_reporting(engine, named_tensors: list[tuple[str, torch.Tensor]], load_format: str) -> list:
    """`run_loader`, returning each worker's report (loaders report through files: raising would kill
    the worker)."""
    with tempfile.TemporaryDirectory() as report_dir:
        run_loader(engine, [*named_tensors, (REPORT_KEY, encode_report_path(report_dir))], load_format)
        reports = [json.load(open(os.path.join(report_dir, f))) for f in sorted(os.listdir(report_dir))]
    if not reports:
        raise RuntimeError(f"SGLang ran {load_format} but no worker reported")
    return reports


def verify_weights(model, named_tensors) -> None:
    """Reload the given tensors and write the names of parameters that changed to the report directory.

    A loader that raises would take SGLang's worker down, so the result goes to a file per worker.
    """
    tensors = dict(named_tensors)
    report = {REPORT_KEY: tensors.pop(REPORT_KEY)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_weights(list(tensors.items()))
    write_report(report, [n for n, p in model.named_parameters() if not torch.equal(_bytes(p.detach()), _bytes(before[n]))])


def reseed(model, named_tensors) -> None:
    """Seed the worker's torch generators (the sampler's): rollouts become a function of the seed, the
    weights and the requests, so a resumed run samples what the uninterrupted one did."""
    seed = int(dict(named_tensors)[SEED_KEY].item())
    torch.manual_seed(seed)


def worker_settings(model, named_tensors) -> None:
    """Report the GPUs this worker process sees (CUDA_VISIBLE_DEVICES: an engine's workers must see
    exactly its bundles' GPUs) and its torch threads (the engine's share of the cores)."""
    write_report(dict(named_tensors), {"visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                       "threads": torch.get_num_threads()})
