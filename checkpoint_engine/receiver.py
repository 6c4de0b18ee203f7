"""A receiving checkpoint-engine worker: a small Ray actor beside one rollout engine (same bundle).

It receives buckets from the trainers over the sync group into its double buffer and has the engine
load each one in place from that buffer (shared memory on CPU, CUDA IPC on GPU). Being its own
process, it keeps the collective and its buffers out of SGLang, and a crash of one receiver is
reported by name instead of taking the engine down.
"""
from __future__ import annotations

from checkpoint_engine.endpoint import Endpoint, engine_delivery


class WeightReceiver:
    def __init__(self, rollout, timeout_s: float):
        self.endpoint = Endpoint()
        self.deliver = engine_delivery([rollout], timeout_s)

    def setup(self, *args, **kwargs) -> int:
        return self.endpoint.setup(*args, **kwargs)

    def push(self, version: int) -> dict:
        return self.endpoint.push(version, deliver=self.deliver)

    def teardown(self) -> None:
        self.endpoint.teardown()
