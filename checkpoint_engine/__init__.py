"""Weight transport from the trainer's parallel layout to the rollout engines (see docs/weight-sync.md).

Reading order: `buckets` (plans and byte layout), `group` (the process group, timeouts, liveness),
`transfer` (one member's double-buffered push), `endpoint` / `receiver` (the members in Ray actors),
`engine` (the driver: setup, push, teardown, metrics, verification).
"""
from checkpoint_engine.engine import CheckpointEngine
from checkpoint_engine.group import SyncError
from checkpoint_engine.transfer import MODES

__all__ = ["CheckpointEngine", "SyncError", "MODES"]
