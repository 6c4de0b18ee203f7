"""A receiving checkpoint-engine worker: a small Ray actor beside one rollout engine (same bundle).

It receives buckets from the trainers over the sync group into its double buffer and has the engine
load each one in place from that buffer (shared memory on CPU, CUDA IPC on GPU). Being its own
process, it keeps the collective and its buffers out of SGLang, and a crash of one receiver is
reported by name instead of taking the engine down.

With the reduce_scatter transport and a tensor-parallel engine there is one receiver per TP rank, each
receiving only that rank's shard of every tensor (`rollout.sglang.tp_shards`). SGLang loads a bucket in all
its TP workers with one request, so the engine's TP receivers load together: the others publish their
chunk's handle in the sync group's store, the rank-0 receiver sends the engine one request carrying
every rank's chunk and, once it was loaded, tells them their slots are free again.
"""
from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Callable, Optional

import torch

from checkpoint_engine.buckets import Bucket, TensorMeta
from checkpoint_engine.endpoint import Endpoint, Load, engine_delivery, engine_load, shard_descriptor


class TPRankDelivery:
    """Delivery for one of an engine's TP-rank receivers (see the module docstring)."""

    def __init__(self, load: Load, store, engine_index: int, tp_rank: int, tp_size: int, timeout_s: float):
        self.load, self.store, self.engine_index = load, store, engine_index
        self.tp_rank, self.tp_size, self.timeout = tp_rank, tp_size, timedelta(seconds=timeout_s)
        self.prefix = ""

    def begin(self, version: int) -> None:
        self.prefix = f"tp-load/v{version}/engine{self.engine_index}"

    def _wait(self, keys: list[str]) -> None:
        self.store.wait(keys, self.timeout)  # raises once the timeout passes

    def __call__(self, bucket: Bucket, layout: tuple[TensorMeta, ...], chunk: torch.Tensor,
                 ok: bool) -> Optional[Callable[[], None]]:
        key = f"{self.prefix}/bucket{bucket.index}"
        mine = shard_descriptor(chunk, layout) if ok else None  # None: failed its checksum, not loaded
        if self.tp_rank:
            self.store.set(f"{key}/rank{self.tp_rank}", pickle.dumps(mine))
            return lambda: self._released(key)
        peers = [f"{key}/rank{r}" for r in range(1, self.tp_size)]
        self._wait(peers)
        shards = [mine] + [pickle.loads(self.store.get(k)) for k in peers]
        for k in peers:
            self.store.delete_key(k)
        if any(s is None for s in shards):  # the push fails at its end (the status all-reduce)
            self.store.set(f"{key}/loaded", b"")
            return None
        loading = self.load(shards)

        def wait() -> None:
            try:
                loading()
            finally:
                self.store.set(f"{key}/loaded", b"")
        return wait

    def _released(self, key: str) -> None:
        """Wait until the engine loaded this bucket (the slot may be refilled after that)."""
        self._wait([f"{key}/loaded"])
        if self.store.add(f"{key}/released", 1) == self.tp_size - 1:  # the last reader tidies up
            self.store.delete_key(f"{key}/loaded")
            self.store.delete_key(f"{key}/released")


class WeightReceiver:
    def __init__(self, rollout, timeout_s: float, engine_index: int = 0, tp_rank: int = 0, tp_size: int = 1):
        self.endpoint = Endpoint()
        self.rollout, self.timeout_s = rollout, timeout_s
        self.engine_index, self.tp_rank, self.tp_size = engine_index, tp_rank, tp_size
        self.deliver = engine_delivery([rollout], timeout_s)

    def setup(self, *args, **kwargs) -> int:
        nbytes = self.endpoint.setup(*args, **kwargs)
        if self.tp_size > 1:
            self.deliver = TPRankDelivery(engine_load(self.rollout, self.timeout_s), self.endpoint.group.store,
                                          self.engine_index, self.tp_rank, self.tp_size, self.timeout_s)
        return nbytes

    def push(self, version: int) -> dict:
        if isinstance(self.deliver, TPRankDelivery):
            self.deliver.begin(version)
        return self.endpoint.push(version, deliver=self.deliver)

    def teardown(self) -> None:
        self.endpoint.teardown()
