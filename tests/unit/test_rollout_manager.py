"""The rollout manager's routing (rollout/manager.py) with stand-in engines: whole groups per engine,
balanced by tokens, reproducible; turns kept on their prefix's engine; seeds from the sample's identity.
The real engines behind it are exercised in tests/integration/test_scale_out.py."""
import concurrent.futures

import pytest

from rl.sample import Sample
from rollout.manager import RolloutManager, request_seed


class _Call:
    def __init__(self, future):
        self._future = future

    def future(self):
        return self._future


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(self.fn(*args))
        except Exception as exc:  # noqa: BLE001
            future.set_exception(exc)
        return _Call(future)


class FakeEngine:
    """Answers turns with as many tokens as each request's cap, and records what it was sent."""
    def __init__(self, fail: bool = False):
        self.turns: list[dict] = []
        self.fail = fail
        self.generate_turns = _Method(self._turns)
        self.complete = _Method(lambda texts, *rest: [f"done {t}" for t in texts])

    def _turns(self, requests):
        if self.fail:
            raise RuntimeError("engine died")
        self.turns.extend(requests)
        return [{"output_ids": [1] * r["max_new_tokens"]} for r in requests]


def _samples(group_sizes: list[int], prompt_len: int = 3) -> list[Sample]:
    return [Sample(group_id=g, prompt="p", prompt_ids=[1] * (prompt_len + g), reference="")
            for g, n in enumerate(group_sizes) for _ in range(n)]


def test_split_keeps_groups_whole_and_balances_tokens():
    manager = RolloutManager([FakeEngine(), FakeEngine()], timeout_s=5)
    samples = _samples([4, 4, 4, 4])
    caps = [10] * len(samples)
    parts = manager.split(samples, caps)
    assert sorted(i for p in parts for i in p) == list(range(len(samples)))
    for part in parts:  # a group never straddles engines
        groups = {samples[i].group_id for i in part}
        assert all(samples[i].group_id in groups for i in part) and len(part) == 4 * len(groups)
    assert [len(p) for p in parts] == [8, 8]
    assert manager.split(samples, caps) == parts  # a function of the batch alone


def test_split_puts_a_large_group_alone():
    manager = RolloutManager([FakeEngine(), FakeEngine()], timeout_s=5)
    samples = _samples([1, 1, 1])
    caps = [100, 30, 30]  # group 0 outweighs the other two together
    parts = manager.split(samples, caps)
    assert sorted(parts) == [[0], [1, 2]]


def test_seeds_follow_the_sample_not_the_batch():
    manager = RolloutManager([FakeEngine()], timeout_s=5, seed=7)
    manager.step = 3
    samples = _samples([2, 2])
    seeds = manager.seeds(samples)
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert manager.seeds(samples[2:]) == seeds[2:]  # another batch, same group and index: same seed
    assert seeds[0] == request_seed(7, 3, 0, 0, 0)
    samples[0].response_ids = [5, 6]  # a partial rollout continued: a new seed for the new segment
    assert manager.seeds(samples)[0] != seeds[0]
    manager.step = 4
    assert manager.seeds(samples)[1] != seeds[1]


def test_turns_stay_on_their_prefix_engine_and_others_go_to_the_least_loaded():
    engines = [FakeEngine(), FakeEngine()]
    manager = RolloutManager(engines, timeout_s=5)
    first = manager.generate_turns([{"input_ids": [1] * 50, "max_new_tokens": 10, "affinity": "episode-a"},
                                    {"input_ids": [1] * 5, "max_new_tokens": 10, "affinity": "episode-b"},
                                    {"input_ids": [1] * 5, "max_new_tokens": 10, "affinity": "episode-c"}])
    assert [len(o["output_ids"]) for o in first.result(5)] == [10, 10, 10]
    # a was heavy: b and c went to the other engine
    assert [len(e.turns) for e in engines] == [1, 2]
    manager.generate_turns([{"input_ids": [1] * 60, "max_new_tokens": 10, "affinity": "episode-b"}]).result(5)
    assert len(engines[1].turns) == 3  # b's next turn follows its prefix
    metrics = manager.take_metrics()
    assert metrics["rollout_engine0_tokens"] == 10 and metrics["rollout_engine1_tokens"] == 30
    assert metrics["rollout_engine0_requests"] == 1 and metrics["rollout_engine1_requests"] == 3
    assert metrics["rollout_engine_imbalance"] == pytest.approx(1.5)
    assert manager.outstanding == [0, 0]  # everything answered: nothing still counted as in flight
    assert manager.take_metrics()["rollout_engine1_tokens"] == 0  # counted once


def test_a_failing_engine_fails_the_combined_call():
    manager = RolloutManager([FakeEngine(fail=True), FakeEngine()], timeout_s=5)
    future = manager.generate_turns([{"input_ids": [1], "max_new_tokens": 1}, {"input_ids": [1] * 9, "max_new_tokens": 1}])
    with pytest.raises(RuntimeError, match="engine died"):
        future.result(5)
    assert manager.outstanding == [0, 0]


def test_completions_go_to_the_least_loaded_engine():
    engines = [FakeEngine(), FakeEngine()]
    manager = RolloutManager(engines, timeout_s=5)
    manager.outstanding[0] = 1000  # engine 0 busy with something else
    assert manager.complete(["a", "b"], 4).result(5) == ["done a", "done b"]
    assert manager.take_metrics()["rollout_engine1_requests"] == 2


def test_a_manager_needs_an_engine():
    with pytest.raises(ValueError, match="at least one engine"):
        RolloutManager([], timeout_s=5)
