"""Fault handling's parts on a real Ray cluster, with small stand-in actors (no engines): the members of
a collective are waited on together, so one that dies is reported at once even while the members
before it still block (checkpoint_engine/members.py); the rollout manager replaces an engine that dies
during a batch and sends its part again, and replaces one that fails or hangs its health probe
(rollout/manager.py). The same paths with the real engines: tests/integration/test_reliability.py."""
import os
import time

import pytest
import ray

from checkpoint_engine.members import MemberFailed, gather
from rl.sample import Sample
from rollout.manager import RolloutManager


@ray.remote(num_cpus=0)
class Member:
    def block(self, seconds: float) -> str:
        time.sleep(seconds)  # stands in for a collective waiting on a dead peer
        return "done"

    def die(self, after: float) -> None:
        time.sleep(after)
        os._exit(1)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_dead_member_is_reported_while_the_others_still_block(local_ray):
    blocked, dying = Member.remote(), Member.remote()
    start = time.monotonic()
    with pytest.raises(MemberFailed) as failed:
        gather([blocked.block.remote(60), dying.die.remote(0.5)], ["trainer rank 0", "trainer rank 1"], 120,
               "trainer train_step")
    assert time.monotonic() - start < 30  # not the 60 s rank 0 blocks, nor the 120 s timeout
    assert failed.value.member == "trainer rank 1" and isinstance(failed.value.cause, ray.exceptions.RayActorError)
    assert "trainer train_step: trainer rank 1 failed" in str(failed.value)
    ray.kill(blocked)


def test_members_still_running_at_the_timeout_are_named(local_ray):
    a, b = Member.remote(), Member.remote()
    assert gather([a.block.remote(0), b.block.remote(0)], ["a", "b"], 60) == ["done", "done"]
    with pytest.raises(MemberFailed, match="push: b did not finish within 1 s"):
        gather([a.block.remote(0), b.block.remote(30)], ["a", "b"], 1, "push")
    ray.kill(a)
    ray.kill(b)


@ray.remote(num_cpus=0)
class StandInEngine:
    """Answers each sample with its seed's last digit as the one new token; can die or hang on cue."""

    def __init__(self, die_on_generate: bool = False, hang_on_probe: bool = False):
        self.die_on_generate, self.hang_on_probe, self.reseeded = die_on_generate, hang_on_probe, []

    def generate(self, samples, caps, seeds):
        if self.die_on_generate:
            os._exit(1)
        for s, seed in zip(samples, seeds):
            s.response_ids = s.response_ids + [seed % 10]
        return samples

    def reseed(self, seed):
        if self.hang_on_probe:
            time.sleep(60)
        self.reseeded.append(seed)

    def seeds_received(self):
        return self.reseeded


def _batch() -> list[Sample]:
    return [Sample(group_id=g, prompt="p", prompt_ids=[1, 2, 3 + g], reference="", response_ids=[7])
            for g in range(4) for _ in range(2)]


def test_an_engine_that_dies_in_a_batch_is_replaced_and_its_part_sent_again(local_ray):
    replaced = []

    def replace(index, cause):
        replaced.append((index, type(cause).__name__))
        return StandInEngine.remote()

    healthy = RolloutManager([StandInEngine.remote(), StandInEngine.remote()], timeout_s=60, seed=5)
    manager = RolloutManager([StandInEngine.remote(), StandInEngine.remote(die_on_generate=True)], timeout_s=60,
                             seed=5, replace=replace)
    healthy.step = manager.step = 2
    expected = healthy.generate(_batch(), [4] * 8)
    got = manager.generate(_batch(), [4] * 8)
    assert replaced == [(1, "ActorDiedError")]
    assert [s.response_ids for s in got] == [s.response_ids for s in expected]  # nothing of the failed try kept
    assert all(len(s.response_ids) == 2 for s in got)
    assert ray.get(manager.engines[1].seeds_received.remote()) == [manager.engine_seed(1)]  # seeded as the step
    assert manager.outstanding == [0, 0]


def test_the_probe_replaces_a_hung_or_dead_engine_and_without_a_callback_the_failure_stands(local_ray):
    replaced = []
    dead = StandInEngine.remote()
    ray.kill(dead)
    manager = RolloutManager([StandInEngine.remote(hang_on_probe=True), dead, StandInEngine.remote()], timeout_s=60,
                             replace=lambda i, cause: replaced.append((i, type(cause).__name__)) or StandInEngine.remote(),
                             probe_timeout_s=2)
    start = time.monotonic()
    manager.begin_step(3)  # reseeds every engine, the probe; replaces (and seeds) those that fail it
    assert time.monotonic() - start < 30
    assert sorted(replaced) == [(0, "TimeoutError"), (1, "ActorDiedError")]
    for j in range(3):
        assert ray.get(manager.engines[j].seeds_received.remote()) == [manager.engine_seed(j)]
    alone = RolloutManager([StandInEngine.remote(die_on_generate=True)], timeout_s=60)
    with pytest.raises(ray.exceptions.RayActorError):
        alone.generate(_batch(), [4] * 8)
