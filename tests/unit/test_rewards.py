"""Reward plug-ins and their execution: loading by path from config, sync / async / per-group rewards,
weighted mixes per task type, and rewards that hang, raise or return NaN (each sample gets the fallback
and a reason, and scoring returns within its bound)."""
import math
import textwrap
import time

import pytest

import tests.reward_plugins  # noqa: F401  (registers the test rewards)
from rewards.registry import as_score, resolve
from rewards.runner import RewardRunner, RewardSpec, part_means
from rl.config import ConfigError, load_config
from rl.sample import Sample


def make(response, reference="4", group=0, task_type="math", **metadata):
    return Sample(group_id=group, prompt="2+2=", prompt_ids=[1], reference=reference, task_type=task_type,
                  response=response, metadata=metadata)


def test_a_plugin_loaded_by_path_from_config(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(textwrap.dedent("""
        def brevity(sample, max_chars=3):
            return (1.0 if len(sample.response) <= max_chars else 0.0), {"chars": len(sample.response)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config({"rewards": {"task_types": {"default": [
        {"name": "team_rewards:brevity", "kwargs": {"max_chars": 2}, "weight": 0.5},
        "exact_match"]}}})
    runner = RewardRunner(config.rewards.task_types)
    samples = [make("4"), make("four")]
    metrics = runner.score(samples)
    assert [s.task_reward for s in samples] == [0.5 * 1.0 + 1.0, 0.5 * 0.0 + 0.0]
    assert samples[1].reward_parts == {"team_rewards:brevity": 0.0, "team_rewards:brevity/chars": 4.0,
                                       "exact_match": 0.0}
    assert metrics["reward_failures"] == 0
    assert part_means(samples)["reward/team_rewards:brevity/chars"] == 2.5


def test_bad_reward_settings_are_named_before_anything_starts():
    with pytest.raises(ConfigError, match=r"rewards.task_types.default\[0\].name: cannot load reward 'nowhere:f'"):
        load_config({"rewards": {"task_types": {"default": [{"name": "nowhere:f"}]}}})
    with pytest.raises(ConfigError, match=r"rewards.task_types.default\[0\].weight: Value .heavy."):
        load_config({"rewards": {"task_types": {"default": [{"name": "exact_match", "weight": "heavy"}]}}})
    with pytest.raises(ConfigError, match="rewards.task_types: has no rewards for task family"):
        load_config({"rewards": {"task_types": {"default": None, "code": ["exact_match"]}}})


def test_sync_async_and_per_group_rewards_mix_by_weight_per_task_type():
    runner = RewardRunner({
        "math": [RewardSpec("exact_match", weight=2.0), RewardSpec("test_async_contains")],
        "style": [RewardSpec("test_group_rank")],
    })
    samples = [make("4"), make("44"), make("ab", task_type="style", group=1), make("abc", task_type="style", group=1)]
    runner.score(samples)
    assert [s.task_reward for s in samples] == [2.0 + 1.0, 0.0 + 1.0, 1.0, 0.0]
    assert samples[1].reward_parts["test_async_contains/length"] == 2.0
    assert resolve("test_group_rank").per_group and resolve("test_async_contains").is_async


def test_a_reward_listed_twice_with_different_settings_is_kept_apart():
    checks = lambda pattern: {"checks": [{"type": "regex", "pattern": pattern}]}  # noqa: E731
    runner = RewardRunner({"default": [RewardSpec("instruction_following", kwargs=checks("4")),
                                       RewardSpec("instruction_following", weight=0.5, kwargs=checks("5"))]})
    samples = [make("4")]
    runner.score(samples)
    assert samples[0].reward_parts["instruction_following#0"] == 1.0
    assert samples[0].reward_parts["instruction_following#1"] == 0.0 and samples[0].task_reward == 1.0


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_hanging_raising_and_nan_rewards_fall_back_with_a_reason(isolation):
    here = "tests.reward_plugins"
    runner = RewardRunner({"default": [RewardSpec(f"{here}:hangs", isolation=isolation, timeout_s=1.0),
                                       RewardSpec(f"{here}:raises", isolation=isolation),
                                       RewardSpec(f"{here}:not_a_number", isolation=isolation),
                                       RewardSpec("exact_match")]}, fallback=-1.0)
    samples = [make("4"), make("5")]
    start = time.monotonic()
    metrics = runner.score(samples)
    assert time.monotonic() - start < 20  # bounded by the 1 s timeout, not the 30 s hang
    for s, exact in zip(samples, (1.0, 0.0)):
        assert s.task_reward == -1.0 * 3 + exact
        reasons = sorted(s.reward_failures)
        assert "hangs: timed out after 1 s" in reasons[0]
        assert "not_a_number: returned nan" in reasons[1]
        assert "raises: raised" in reasons[2] and "reward service unreachable" in reasons[2]
    assert metrics["reward_failures"] == 6 and metrics["reward_timeouts"] == 2
    # the runner still works afterwards (a fresh thread pool replaced the one with the hung threads)
    again = [make("4")]
    runner.score(again)
    assert again[0].reward_parts["exact_match"] == 1.0


def test_an_async_reward_that_blocks_its_event_loop_cannot_stall_scoring():
    # the batch's deadline follows from the slowest call's timeout and the number of calls
    runner = RewardRunner({"default": [RewardSpec("tests.reward_plugins:never_yields", timeout_s=0.5),
                                       RewardSpec("exact_match", timeout_s=0.5)]})
    samples = [make("4", block=True)]
    start = time.monotonic()
    runner.score(samples)
    assert time.monotonic() - start < 8  # the batch deadline, before the 8 s block ends
    assert any("did not finish" in f for f in samples[0].reward_failures), samples[0].reward_failures
    later = [make("4")]
    runner.score(later)  # on a fresh event loop
    assert later[0].reward_parts["exact_match"] == 1.0 and later[0].reward_failures == []


def test_a_process_isolated_reward_over_its_memory_limit_fails_cleanly():
    runner = RewardRunner({"default": [RewardSpec("tests.reward_plugins:allocates", isolation="process", memory_mb=512)]})
    samples = [make("4")]
    runner.score(samples)
    assert samples[0].task_reward == 0.0 and "MemoryError" in samples[0].reward_failures[0]


def test_results_are_read_as_score_and_sub_scores():
    assert as_score(1) == (1.0, {})
    assert as_score((0.5, {"a": 1})) == (0.5, {"a": 1.0})
    assert as_score({"score": 0.25, "b": 2}) == (0.25, {"b": 2.0})
    with pytest.raises(ValueError, match="returned inf"):
        as_score(math.inf)
    with pytest.raises(ValueError, match="'score' key"):
        as_score({"value": 1})
