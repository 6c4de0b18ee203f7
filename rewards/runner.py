"""Scoring a batch of samples with each task type's mix of rewards, without ever blocking the loop.

Every call (one sample, or one group for a per-group reward) runs under a semaphore of
`rewards.concurrency` and a per-call timeout: async functions are awaited, sync ones run in a thread or,
with `isolation: process`, in a child process that is killed at the timeout (`rewards/isolation.py`).
A call that raises, times out or returns a non-finite score gives its samples the configured fallback
and a logged reason, and the batch goes on. The calls run on an event loop in a thread of their own,
and the caller waits at most a deadline for the whole batch, so even an async reward that never
yields (and so stalls that event loop) cannot stall the RL loop: unscored samples get the fallback and
the runner starts a fresh event loop.

A sample's `task_reward` is the weighted sum of its task type's rewards; `reward_parts` holds each
reward's score (under its name) and sub-scores ("name/part").
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from rewards.isolation import call_in_process
from rewards.registry import NonFiniteScore, RewardFunction, as_score, resolve
from rl.sample import by_group

log = logging.getLogger(__name__)
DEFAULT_TASK_TYPE = "default"
ISOLATIONS = ("thread", "process")


@dataclass
class RewardSpec:
    """One reward in a task type's mix (`rewards.task_types.<type>` is a list of these)."""
    name: str = "exact_match"  # a registered reward (rewards/registry.py) or "package.module:function"
    weight: float = 1.0
    per_group: Optional[bool] = None  # for a path to an undecorated function: it scores a whole group
    # thread, or process: killable at the timeout (untrusted / CPU-heavy code)
    isolation: str = field(default="thread", metadata={"choices": ISOLATIONS})
    timeout_s: Optional[float] = field(default=None, metadata={"gt": 0})  # None: rewards.timeout_s
    # process isolation: address-space limit of the child
    memory_mb: Optional[int] = field(default=None, metadata={"gt": 0})
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the function

    def check(self) -> None:
        """What the fields' bounds (metadata) cannot say: the reward loads, and its weight is finite."""
        try:
            resolve(self.name, self.per_group)
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None
        if not math.isfinite(self.weight):
            raise ValueError(f"weight: must be finite (got {self.weight!r})")


@dataclass
class _Route:
    spec: RewardSpec
    function: RewardFunction
    timeout_s: float
    key: str  # its name in reward_parts and metrics: the reward's name, "#i" added when a type lists it twice

    @property
    def bound_s(self) -> float:
        """The longest a call may take: process isolation kills the child itself at the timeout, and
        this bound, a little later, is the backstop."""
        return self.timeout_s + (5.0 if self.spec.isolation == "process" else 0.0)


def _routes(specs: list[RewardSpec], timeout_s: float) -> list[_Route]:
    names = [s.name for s in specs]
    return [_Route(s, resolve(s.name, s.per_group), s.timeout_s or timeout_s,
                   s.name if names.count(s.name) == 1 else f"{s.name}#{i}") for i, s in enumerate(specs)]


class RewardRunner:
    def __init__(self, task_types: dict[str, list[RewardSpec]], timeout_s: float = 30.0, concurrency: int = 8,
                 fallback: float = 0.0):
        """`task_types`: each task type's rewards; "default" serves the types not listed."""
        self.timeout_s, self.concurrency, self.fallback = timeout_s, concurrency, fallback
        self.routes = {task_type: _routes(specs, timeout_s) for task_type, specs in task_types.items()}
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward")
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # --- the event loop thread --------------------------------------------------------------------------
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True, name="reward-loop").start()
            self._loop = loop
        return self._loop

    def _abandon_event_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)  # runs once whatever stalls it yields, if ever

    def _current(self) -> bool:
        """False in an abandoned event loop: its late results belong to a batch already returned."""
        return asyncio.get_running_loop() is self._loop

    def _replace_threads(self) -> None:
        """A sync reward timed out in a thread, which cannot be stopped and may never return: later calls
        get a fresh pool, so hung threads cannot use up the workers (the old pool is left to finish)."""
        old = self._threads
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="reward")
        old.shutdown(wait=False)

    def close(self) -> None:
        self._abandon_event_loop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # --- one call ------------------------------------------------------------------------------------
    async def _invoke(self, route: _Route, arg: Any) -> Any:
        fn, spec = route.function, route.spec
        if spec.isolation == "process":
            call = functools.partial(call_in_process, fn.path, fn.per_group, arg, spec.kwargs, route.timeout_s,
                                     spec.memory_mb)
            return await asyncio.get_running_loop().run_in_executor(self._threads, call)
        if fn.is_async:
            return await fn.fn(arg, **spec.kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._threads,
                                                                functools.partial(fn.fn, arg, **spec.kwargs))

    async def _call(self, route: _Route, samples: list, semaphore: asyncio.Semaphore) -> None:
        """Score `samples` (a group for a per-group reward, else one sample) and record the outcome."""
        name = route.key
        try:
            async with semaphore:
                raw = await asyncio.wait_for(self._invoke(route, samples if route.function.per_group else samples[0]),
                                             route.bound_s)
            if not self._current():
                return
            values = list(raw) if route.function.per_group else [raw]
            if len(values) != len(samples):
                raise ValueError(f"returned {len(values)} results for a group of {len(samples)}")
            for sample, value in zip(samples, values):
                try:
                    score, parts = as_score(value)
                except (NonFiniteScore, ValueError, TypeError) as exc:
                    self._fail(sample, name, str(exc))
                    continue
                sample.reward_parts[name] = score
                sample.reward_parts.update({f"{name}/{k}": v for k, v in parts.items()})
        except (asyncio.TimeoutError, TimeoutError):
            if not self._current():
                return
            if route.spec.isolation == "thread" and not route.function.is_async:
                self._replace_threads()
            for sample in samples:
                self._fail(sample, name, f"timed out after {route.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - a reward's failure is the sample's, never the run's
            if not self._current():
                return
            for sample in samples:
                self._fail(sample, name, f"raised {type(exc).__name__}: {exc}")

    def _fail(self, sample, name: str, reason: str) -> None:
        sample.reward_parts[name] = self.fallback
        sample.reward_failures.append(f"{name}: {reason}")

    # --- a batch -----------------------------------------------------------------------------------------
    def _routes_for(self, task_type: str) -> list[_Route]:
        routes = self.routes.get(task_type, self.routes.get(DEFAULT_TASK_TYPE))
        if routes is None:
            raise ValueError(f"no rewards for task type {task_type!r} and no 'default' in rewards.task_types")
        return routes

    async def _score_all(self, calls: list[tuple[_Route, list]]) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)
        await asyncio.gather(*(self._call(route, samples, semaphore) for route, samples in calls))

    def score(self, samples: list) -> dict[str, float]:
        """Fill every sample's task_reward, reward_parts and reward_failures; returns metrics."""
        calls = []
        for s in samples:
            s.reward_parts, s.reward_failures = {}, []
        for group in by_group(samples).values():  # a group's samples share the prompt, so its task type
            for route in self._routes_for(group[0].task_type):
                calls += [(route, group)] if route.function.per_group else [(route, [s]) for s in group]
        longest = max((r.bound_s for r, _ in calls), default=0.0)
        deadline = longest * (1 + len(calls) / self.concurrency) + 5.0  # every call queued behind the slowest
        future = asyncio.run_coroutine_threadsafe(self._score_all(calls), self._event_loop())
        try:
            future.result(timeout=deadline)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._abandon_event_loop()
            for route, group in calls:
                for s in group:
                    if route.key not in s.reward_parts:
                        self._fail(s, route.key, f"the reward event loop did not finish within {deadline:.0f} s "
                                                        "(an async reward that never yields?)")
        for s in samples:
            routes = self._routes_for(s.task_type)
            s.task_reward = sum(r.spec.weight * s.reward_parts.get(r.key, self.fallback) for r in routes)
        failures = [f for s in samples for f in s.reward_failures]
        if failures:
            log.warning("%d reward call(s) fell back to %g; first: %s", len(failures), self.fallback, failures[0])
        return {"reward_failures": float(len(failures)),
                "reward_timeouts": float(sum("timed out" in f or "did not finish" in f for f in failures))}


def part_means(samples: list) -> dict[str, float]:
    """The mean of each reward's score and sub-scores over `samples`, as "reward/<name>" metrics."""
    values: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for key, value in s.reward_parts.items():
            values[key].append(value)
    return {f"reward/{k}": sum(v) / len(v) for k, v in sorted(values.items())}
