"""Reward plug-ins: functions registered with `@reward`, found by name or by a "module:function" path.

A reward function scores one `Sample` (`fn(sample, **kwargs)`) or, registered with `per_group=True`, all
K samples of a prompt at once (`fn(samples, **kwargs)`, one result per sample, in order). It may be a
plain or an `async` function. A result is a score, a `(score, {name: sub-score})` pair, or a dict with
a "score" key and sub-scores beside it; sub-scores are logged, the score is what the run optimises.

    from rewards import reward

    @reward("brevity")
    def brevity(sample, max_words: int = 50):
        return 1.0 if len(sample.response.split()) <= max_words else 0.0

A config refers to it as `brevity` once its module was imported, or always as `my_pkg.rewards:brevity`.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

BUILTIN_MODULES = ("rewards.builtin.verifiable", "rewards.builtin.instructions", "rewards.builtin.code", "rewards.builtin.agentic")


@dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: Callable
    per_group: bool
    path: str  # "module:function", importable in another process (process isolation)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)


_registry: dict[str, RewardFunction] = {}


def reward(name: Optional[str] = None, *, per_group: bool = False) -> Callable[[Callable], Callable]:
    """Register a reward function under `name` (default: the function's name)."""
    def register(fn: Callable) -> Callable:
        key = name or fn.__name__
        entry = RewardFunction(key, fn, per_group, f"{fn.__module__}:{fn.__qualname__}")
        known = _registry.get(key)
        if known is not None and known.path != entry.path:
            raise ValueError(f"reward {key!r} is registered twice ({known.path} and {entry.path})")
        _registry[key] = entry
        fn.tandem_reward = entry
        return fn
    return register


def registered() -> list[str]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(_registry)


def resolve(ref: str, per_group: Optional[bool] = None) -> RewardFunction:
    """The reward `ref` names: a registered name, or "module:function" (imported; a function that was
    not decorated is per-sample unless `per_group` says otherwise). Raises ValueError saying why not."""
    if ":" not in ref:
        if ref not in registered():
            raise ValueError(f"unknown reward {ref!r} (registered: {', '.join(registered())}; "
                             f"or give a 'module:function' path)")
        entry = _registry[ref]
    else:
        module_name, _, attr = ref.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load reward {ref!r}: {exc}") from None
        if not callable(target):
            raise ValueError(f"reward {ref!r} is not callable")
        entry = getattr(target, "tandem_reward", None) or RewardFunction(attr, target, False, ref)
    if per_group is not None and per_group != entry.per_group:
        entry = RewardFunction(entry.name, entry.fn, per_group, entry.path)
    return entry


class NonFiniteScore(ValueError):
    pass


def as_score(value: Any) -> tuple[float, dict[str, float]]:
    """A reward function's result as (score, sub-scores). Raises NonFiniteScore for NaN or infinity."""
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward dict needs a 'score' key (got keys {sorted(value)})")
        parts = {k: float(v) for k, v in value.items() if k != "score"}
        value = value["score"]
    elif isinstance(value, tuple):
        value, parts = value
        parts = {k: float(v) for k, v in parts.items()}
    else:
        parts = {}
    score = float(value)
    if not math.isfinite(score):
        raise NonFiniteScore(f"returned {score}")
    return score, parts
