"""How weights reach the rollout engines after each update (`sync`; docs/weight-sync.md). Bounds sit in
each field's metadata, checked by rl/config.py before any actor starts."""
from __future__ import annotations

from dataclasses import dataclass, field

from checkpoint_engine.transports import TRANSPORTS


@dataclass
class WeightSyncConfig:
    # broadcast: each bucket's owner broadcasts it to every receiver (Kimi K2's checkpoint engine);
    # reduce_scatter: trainer ranks add their shards, each receiver gets only its chunk;
    # colocated: no collective, the owning trainer rank hands buckets to the engines in place.
    transport: str = field(default="broadcast", metadata={"choices": TRANSPORTS})  # checkpoint_engine/transports.py
    # bucket size (slime's default); a tensor larger than this gets its own
    bucket_mb: float = field(default=512.0, metadata={"gt": 0})
    verify_checksums: bool = True  # per-bucket checksum on every receiver
    verify_full: bool = False  # after each push, compare all engine weights with the trainer's (slow)
    timeout_s: float = field(default=120.0, metadata={"gt": 0})  # bound on setup, every collective and a push

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)
