"""The rollout manager: owns a set of rollout engines (Ray actors of `RolloutEngine`) and spreads every
request over them, so callers (the collector, agent episodes, the OpenAI gateway, PARL sub-agents)
never pick an engine themselves.

Routing:
- a step's batch (`generate`): whole prompt groups go to one engine each, so a group's K samples share
  the prompt's cached prefix; groups are dealt largest first to the engine with the fewest tokens
  assigned so far. The split is a function of the batch alone, so a run repeats exactly;
- agent turns (`generate_turns`) and judge completions (`complete`): to the engine with the fewest
  outstanding tokens, except that requests with the same `affinity` key (an episode's prompt) stay on
  the engine that already holds their prefix for the rest of the step.
Every sample gets its own sampling seed from (seed, step, group, sample, tokens so far); the engines use
it with `rollout.deterministic_sampling`. `take_metrics` reports each engine's tokens and tokens/s.

Engine faults: with a `replace` callback (the loop's: rl/loop.py), every engine is probed before each
step (its reseed, a round trip to its SGLang schedulers, bounded by `probe_timeout_s`), and one that died or
hangs is replaced: killed, started again in its bundles and given the current weights. An engine
that dies during a step's batch is replaced the same way and its part of the batch is sent again
from the samples as they were before the call, so nothing of the failed attempt is kept.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import ray

from rl.sample import Sample


def request_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and runs (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class EngineLoad:
    requests: int = 0
    tokens: int = 0  # tokens generated
    busy_seconds: float = 0.0  # wall time with a call of ours in flight on the engine


Replace = Callable[[int, BaseException], Any]  # (engine index, why) -> the new engine's actor handle


class RolloutManager:
    def __init__(self, engines: list, timeout_s: float, seed: int = 0, replace: Optional[Replace] = None,
                 probe_timeout_s: float = 30.0):
        if not engines:
            raise ValueError("a rollout manager needs at least one engine")
        self.engines, self.timeout_s, self.seed = list(engines), timeout_s, seed
        self.replace, self.probe_timeout_s = replace, probe_timeout_s
        self.step = 0
        self._lock = threading.Lock()
        self.outstanding = [0] * len(engines)  # tokens (prompt + cap) of the calls in flight, per engine
        self._in_flight = [0] * len(engines)
        self._busy_since = [0.0] * len(engines)
        self.affinity: dict[Hashable, int] = {}
        self.load = [EngineLoad() for _ in engines]
        self._context_length: Optional[int] = None

    # --- bookkeeping --------------------------------------------------------------------------------
    def _call_started(self, engine: int, cost: int = 0) -> None:
        """A call goes out to `engine` (with `cost` tokens not reserved by `_pick`)."""
        with self._lock:
            self.outstanding[engine] += cost
            if self._in_flight[engine] == 0:
                self._busy_since[engine] = time.perf_counter()
            self._in_flight[engine] += 1

    def _finish(self, engine: int, cost: int, requests: int, tokens: int) -> None:
        with self._lock:
            self.outstanding[engine] -= cost
            self._in_flight[engine] -= 1
            load = self.load[engine]
            load.requests, load.tokens = load.requests + requests, load.tokens + tokens
            if self._in_flight[engine] == 0:
                load.busy_seconds += time.perf_counter() - self._busy_since[engine]

    def _pick(self, cost: int, key: Optional[Hashable]) -> int:
        """The engine for one request, with its `cost` tokens reserved there: its key's engine, else the
        one with the fewest outstanding tokens."""
        with self._lock:
            engine = self.affinity.get(key) if key is not None else None
            if engine is None:
                engine = min(range(len(self.engines)), key=lambda j: (self.outstanding[j], j))
                if key is not None:
                    self.affinity[key] = engine
            self.outstanding[engine] += cost
            return engine

    # --- a step -------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """A new step: per-request seeds follow it; every engine's sampler is reseeded from (seed, step,
        engine), so what a step samples does not depend on what earlier steps did; prefixes cached
        before the last weight push are gone, so episode affinities start afresh."""
        self.step = step
        with self._lock:
            self.affinity.clear()
        if self.replace is not None:
            self.check_health()  # reseeds every engine, replacing those that do not answer
        else:
            self.call_all_each(lambda j, e: e.reseed.remote(self.engine_seed(j)))

    def engine_seed(self, engine: int) -> int:
        return request_seed(self.seed, self.step, engine)

    # --- engine faults ------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Probe every engine at once by seeding its sampler for the step (a round trip to each of its
        SGLang schedulers, which the step needs anyway); replace those that failed or did not answer
        within the bound."""
        probes = {e.reseed.remote(self.engine_seed(j)): j for j, e in enumerate(self.engines)}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=self.probe_timeout_s)
        for ref, j in probes.items():
            if ref not in ready:
                self._replace(j, TimeoutError(f"rollout engine {j} did not answer its health probe within "
                                              f"{self.probe_timeout_s:g} s"))
                continue
            try:
                ray.get(ref)
            except Exception as exc:  # RayActorError (it died), RayTaskError (its scheduler is gone)
                self._replace(j, exc)

    def _replace(self, engine: int, cause: BaseException) -> None:
        """Engine `engine` failed: the callback replaces it (or raises `cause` when it may not); the
        new one's sampler is seeded as this step's was."""
        if self.replace is None:
            raise cause
        self.engines[engine] = self.replace(engine, cause)
        ray.get(self.engines[engine].reseed.remote(self.engine_seed(engine)), timeout=self.timeout_s)

    def split(self, samples: list[Sample], caps: list[int]) -> list[list[int]]:
        """Indices of `samples` per engine: whole groups, largest first, to the least-assigned engine."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            groups[s.group_id].append(i)
        cost = {g: sum(len(samples[i].tokens) + caps[i] for i in idx) for g, idx in groups.items()}
        assigned, parts = [0] * len(self.engines), [[] for _ in self.engines]
        for g in sorted(groups, key=lambda g: (-cost[g], groups[g][0])):
            j = min(range(len(self.engines)), key=lambda j: (assigned[j], j))
            assigned[j] += cost[g]
            parts[j].extend(groups[g])
        return [sorted(p) for p in parts]

    def seeds(self, samples: list[Sample]) -> list[int]:
        """Each sample's sampling seed: (run seed, step, group, index in group, tokens already sampled)."""
        index: dict[int, int] = defaultdict(int)
        out = []
        for s in samples:
            out.append(request_seed(self.seed, self.step, s.group_id, index[s.group_id], len(s.response_ids)))
            index[s.group_id] += 1
        return out

    def generate(self, samples: list[Sample], caps: list[int]) -> list[Sample]:
        """`RolloutEngine.generate` over the engines; the results in the order of `samples`."""
        seeds, out = self.seeds(samples), list(samples)
        calls = {}

        def send(j: int, part: list[int], cost: int):
            self._call_started(j, cost)
            ref = self.engines[j].generate.remote([samples[i] for i in part], [caps[i] for i in part],
                                                  [seeds[i] for i in part])
            calls[ref] = (j, part, cost)
            return ref

        for j, part in enumerate(self.split(samples, caps)):
            if part:
                send(j, part, sum(len(samples[i].tokens) + caps[i] for i in part))
        pending, deadline = list(calls), time.monotonic() + self.timeout_s
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"rollout engines {sorted(calls[r][0] for r in pending)} did not answer "
                                       f"within {self.timeout_s:g} s")
                j, part, cost = calls[ready[0]]
                try:
                    results = ray.get(ready[0])
                except ray.exceptions.RayActorError as exc:  # the engine died: a new one takes its part again
                    self._finish(j, cost, 0, 0)
                    self._replace(j, exc)
                    pending.append(send(j, part, cost))
                    continue
                for i, r in zip(part, results):
                    out[i] = r
                self._finish(j, cost, len(part), sum(len(r.response_ids) - len(samples[i].response_ids)
                                                     for i, r in zip(part, results)))
        finally:
            for ref in pending:
                j, _part, cost = calls[ref]
                self._finish(j, cost, 0, 0)
        return out

    # --- requests that arrive one by one (agent turns, judge completions) ------------------------------
    def generate_turns(self, requests: list[dict]) -> concurrent.futures.Future:
        """`RolloutEngine.generate_turns` over the engines (each request routed on its own, by its
        `affinity` key when it has one); a future of the results in request order."""
        by_engine: dict[int, list[int]] = defaultdict(list)
        costs = [len(r["input_ids"]) + r["max_new_tokens"] for r in requests]
        for i, r in enumerate(requests):
            by_engine[self._pick(costs[i], r.get("affinity"))].append(i)
        results: list = [None] * len(requests)
        combined: concurrent.futures.Future = concurrent.futures.Future()
        remaining = [len(by_engine)]

        def done(j: int, idx: list[int], cost: int, future: concurrent.futures.Future) -> None:
            error = future.exception()
            outputs = [] if error else future.result()
            self._finish(j, cost, len(idx), sum(len(o["output_ids"]) for o in outputs))
            if error is not None:
                if not combined.done():
                    combined.set_exception(error)
                return
            for i, o in zip(idx, outputs):
                results[i] = o
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and not combined.done():
                combined.set_result(results)

        for j, idx in by_engine.items():
            cost = sum(costs[i] for i in idx)
            self._call_started(j)
            future = self.engines[j].generate_turns.remote([requests[i] for i in idx]).future()
            future.add_done_callback(lambda f, j=j, idx=idx, cost=cost: done(j, idx, cost, f))
        if not requests:
            combined.set_result([])
        return combined

    def complete(self, texts: list[str], max_new_tokens: int, temperature: float = 0.0,
                 regex: Optional[str] = None) -> concurrent.futures.Future:
        """`RolloutEngine.complete` on the least-loaded engine: a future of the completions."""
        cost = len(texts) * max_new_tokens
        j = self._pick(cost, None)
        self._call_started(j)
        future = self.engines[j].complete.remote(texts, max_new_tokens, temperature, regex).future()
        future.add_done_callback(lambda f: self._finish(j, cost, len(texts), 0))
        return future

    # --- every engine ---------------------------------------------------------------------------------
    def call_all_each(self, call) -> list:
        """`call(index, engine)` -> an ObjectRef, on every engine; their results (bounded by the timeout)."""
        return ray.get([call(j, e) for j, e in enumerate(self.engines)], timeout=self.timeout_s)

    def call_all(self, method: str, *args) -> list:
        return self.call_all_each(lambda _j, e: getattr(e, method).remote(*args))

    def context_length(self) -> int:
        """The longest sequence every engine accepts."""
        if self._context_length is None:
            self._context_length = min(self.call_all("context_length"))
        return self._context_length

    def take_metrics(self) -> dict[str, float]:
        """Per engine since the last call: requests, tokens generated, tokens/s while busy; and how
        uneven the tokens were (max / mean; 1.0 is an even split)."""
        with self._lock:
            loads, self.load = self.load, [EngineLoad() for _ in self.engines]
        metrics: dict[str, float] = {}
        for j, load in enumerate(loads):
            metrics[f"rollout_engine{j}_requests"] = float(load.requests)
            metrics[f"rollout_engine{j}_tokens"] = float(load.tokens)
            metrics[f"rollout_engine{j}_tokens_per_s"] = load.tokens / load.busy_seconds if load.busy_seconds else 0.0
        mean = sum(load.tokens for load in loads) / len(loads)
        metrics["rollout_engine_imbalance"] = max(load.tokens for load in loads) / mean if mean else 1.0
        return metrics
