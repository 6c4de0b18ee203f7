"""Weight transport from the trainer's parallel layout to the rollout engines."""
from checkpoint_engine.object_store import ObjectStoreWeightSync

__all__ = ["ObjectStoreWeightSync"]
