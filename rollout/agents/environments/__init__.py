"""Environments of agentic rollouts (base.py: the interface), by name or `module:Class`."""
from __future__ import annotations

import importlib

from rollout.agents.environments.base import Environment
from rollout.agents.environments.calculator import CalculatorEnvironment
from rollout.agents.environments.knowledge_base import DeepSearchEnvironment, WideSearchEnvironment

BUILTIN = {cls.name: cls for cls in (CalculatorEnvironment, WideSearchEnvironment, DeepSearchEnvironment)}


def environment_class(name: str) -> type[Environment]:
    """A built-in environment's class, or a user's `module:Class`; ValueError says what is wrong."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown environment {name!r} (built in: {sorted(BUILTIN)}, or module:Class)")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load environment {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"{name!r} is not a subclass of rollout.agents.environments.Environment")
    return cls


class EnvironmentTask:
    """An environment's generated tasks as a prompt-stream task (rl/data/prompts.py)."""

    def __init__(self, name: str, seed: int, options: dict):
        self.cls, self.seed, self.options = environment_class(name), seed, dict(options)

    def problem(self, index: int):
        return self.cls.generate(index, self.seed, **self.options)
