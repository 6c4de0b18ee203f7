"""Warm-started demo models committed with the code, so a fresh clone skips their fine-tuning.

Each folder is a model directory exactly as rl/demo/warm_start.py's `demo_model_path` builds it, named
as its cache entry (`tiny-<architecture>-<task>-<digest of everything that determines it>`), so a run
whose settings differ in anything that matters does not find it and builds its own. Refresh one after
changing its recipe with `python -m rl.demo.prebuilt --config-name <preset>`.
"""
from __future__ import annotations

import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))


def restore(name: str, dest: str) -> bool:
    """Copy the committed model `name` to `dest`; False when none is committed."""
    source = os.path.join(HERE, name)
    if not os.path.isfile(os.path.join(source, "warm_start.json")):
        return False
    shutil.copytree(source, dest)
    return True
