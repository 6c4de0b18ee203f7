"""The simplest weight sync: HF-named full tensors through Ray's object store into each engine.

Every trainer rank takes part in gathering its TP shards (a collective); rank 0's full state dict is
put in the object store once and each rollout engine loads it with SGLang's
`update_weights_from_tensor`. The bucketed, pipelined transports come with the checkpoint-engine
issue; this one keeps the same `push(version)` contract.
"""
from __future__ import annotations

import time

import ray


class ObjectStoreWeightSync:
    def __init__(self, trainers: list, rollouts: list, timeout_s: float):
        self.trainers, self.rollouts, self.timeout_s = trainers, rollouts, timeout_s

    def push(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        gathered = [t.hf_state_dict.remote() for t in self.trainers]
        full_ref = gathered[0]  # TP rank 0 holds the full tensors; the others return None
        ray.get(gathered[1:], timeout=self.timeout_s)
        loads = ray.get([r.update_weights.remote(full_ref, version) for r in self.rollouts], timeout=self.timeout_s)
        return {"sync_seconds": time.perf_counter() - start,
                "sync_load_seconds": max(l["load_seconds"] for l in loads)}
