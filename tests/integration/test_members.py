"""checkpoint_engine/members.py on a real Ray cluster: the members of a collective are waited on together,
so one that dies is reported at once even while the members before it are still blocked."""
import os
import time

import pytest
import ray

from checkpoint_engine.members import MemberFailed, gather


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
