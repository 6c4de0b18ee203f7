"""What a checkpoint holds to resume the loop, and where checkpoints live.

Every trainer rank saves its model, optimizer, lr schedule and RNG (rl/trainer/checkpoint.py); the
loop's own state rides along as the `extra` of that save: step, weight version, data position, the
partial-rollout buffer and Toggle's budgets. The engine's marker file, written last, makes a
checkpoint complete, so a run killed while saving leaves an incomplete one that is never resumed.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from rl.trainer.checkpoint import MARKER


def complete_checkpoints(root: str) -> list[str]:
    """The complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, MARKER))]


def resume_path(resume: Optional[str], root: str) -> Optional[str]:
    """`checkpoint.resume` resolved: "auto" is the newest complete checkpoint under `root` (None if none)."""
    if resume != "auto":
        return resume
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save(loop, root: str, keep: int) -> str:
    """Save the trainers with the loop's state beside them; older complete checkpoints beyond `keep`
    are removed."""
    path = os.path.join(root, f"step_{loop.step_index:06d}")
    shutil.rmtree(path, ignore_errors=True)  # an incomplete one, from a run killed while saving
    loop.call_trainers("save_checkpoint", path, extra={"loop": loop.state_dict()})
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def restore(loop, path: str) -> None:
    """Load a checkpoint into the trainers and the loop, then push the weights to the engines (if any)."""
    extra = loop.call_trainers("load_checkpoint", path)
    loop.load_state_dict(extra["loop"])
    if loop.engines.sync is not None:
        loop.engines.sync.push(loop.weight_version)
