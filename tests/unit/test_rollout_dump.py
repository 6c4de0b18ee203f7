"""rl/rollout_dump.py: a step's samples survive the round trip to disk exactly, and a replay's settings
are checked before anything starts."""
import numpy as np
import pytest

from rl.config import ConfigError, load_config
from rl.rollout_dump import dumped_steps, read_step, step_path, write_step
from rl.sample import Sample


def _samples() -> list[Sample]:
    a = Sample(group_id=0, prompt="1+2=", prompt_ids=[5, 6, 7], reference="3", family="add", task_type="math",
               temperature=0.7, max_new_tokens=8, metadata={"tests": ["x"]}, response_ids=[9, 2],
               response="3", rollout_logprobs=[-0.25, -1e-7], finish_reason="stop", weight_version=3,
               token_versions=[2, 3], loss_mask=[1.0, 0.0], task_reward=1.0, reward_parts={"exact": 1.0},
               reward=0.9, advantage=0.45, agent=object())  # the agent trace is never dumped
    b = Sample(group_id=0, prompt="1+2=", prompt_ids=[5, 6, 7], reference="3", ptx=False, reward=0.0, advantage=-0.45,
               reward_failures=["timeout"])
    return [a, b]


def test_a_step_reads_back_as_the_trainers_got_it(tmp_path):
    samples = _samples()
    path = write_step(str(tmp_path), 7, samples)
    assert path == step_path(str(tmp_path), 7) and path.endswith("step_000007.jsonl.gz")
    back = read_step(str(tmp_path), 7)
    assert back[0].agent is None
    samples[0].agent = None
    assert back == samples  # every field, floats bit for bit
    assert dumped_steps(str(tmp_path)) == [7]


def test_moe_routing_reads_back_as_an_array(tmp_path):
    samples = _samples()
    samples[0].agent = None
    samples[0].routed_experts = np.arange(16, dtype=np.int16).reshape(4, 2, 2) - 1  # -1: not replayed
    write_step(str(tmp_path), 1, samples)
    back = read_step(str(tmp_path), 1)
    assert back[0].routed_experts.dtype == np.int16 and (back[0].routed_experts == samples[0].routed_experts).all()
    assert back[1].routed_experts is None


def test_a_missing_step_names_the_setting_and_what_is_there(tmp_path):
    write_step(str(tmp_path), 2, _samples())
    write_step(str(tmp_path), 3, _samples())
    with pytest.raises(FileNotFoundError, match=r"^rollout.replay_dir: .*step_000005.jsonl.gz is missing .* steps 2..3"):
        read_step(str(tmp_path), 5)


def test_replay_settings_are_checked_before_start(tmp_path):
    with pytest.raises(ConfigError, match=r"^rollout.replay_dir: holds no dumped step"):
        load_config({"rollout": {"replay_dir": str(tmp_path)}, "eval": {"every": 0}})
    write_step(str(tmp_path), 1, _samples())
    with pytest.raises(ConfigError, match=r"^eval.every: needs the rollout engines"):
        load_config({"rollout": {"replay_dir": str(tmp_path)}})  # the default evaluates every 10 steps
    with pytest.raises(ConfigError, match=r"^critic.every: needs the rollout engines"):
        load_config({"rollout": {"replay_dir": str(tmp_path)}, "eval": {"every": 0},
                     "critic": {"every": 1, "task_types": ["addition"]}})
    assert load_config({"rollout": {"replay_dir": str(tmp_path)}, "eval": {"every": 0}}).rollout.replay_dir
