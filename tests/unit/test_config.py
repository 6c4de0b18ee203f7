"""Bad configs stop before any actor starts, with one line naming the field."""
import os
import subprocess
import sys

import pytest

from rl.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("override, field", [
    ({"model": {"path": "/no/such/model"}}, "model.path"),
    ({"trainer": {"tensor_parallel_size": 3}}, "trainer.tensor_parallel_size"),
    ({"trainer": {"pipeline_parallel_size": 3}}, "trainer.pipeline_parallel_size"),
    ({"trainer": {"expert_parallel_size": 2}}, "trainer.expert_parallel_size"),
    ({"trainer": {"world_size": 3, "tensor_parallel_size": 2}}, "trainer.world_size"),
    ({"trainer": {"optimizer": "sgd"}}, "trainer.optimizer"),
    ({"agent": {"environment": "browser"}}, "agent.environment"),
    ({"agent": {"environment": "no.such.module:Env"}}, "agent.environment"),
    ({"agent": {"environment": "calculator", "max_turns": 0}}, "agent.max_turns"),
    ({"agent": {"environment": "calculator", "tool_result": "<r></r>"}}, "agent.tool_result"),
    ({"agent": {"environment": "calculator"}, "rollout": {"partial_segment_tokens": 4}}, "rollout.partial_segment_tokens"),
    ({"agent": {"swarm": {"enabled": True}}}, "agent.swarm.enabled"),
    ({"agent": {"environment": "wide_search", "swarm": {"enabled": True, "anneal_schedule": "exponential"}}},
     "agent.swarm.anneal_schedule"),
    ({"agent": {"environment": "wide_search", "swarm": {"enabled": True, "parallel_reward": "max"}}},
     "agent.swarm.parallel_reward"),
    ({"agent": {"environment": "wide_search", "swarm": {"enabled": True, "lambda_parallel": -0.1}}},
     "agent.swarm.lambda_parallel"),
    ({"agent": {"environment": "wide_search", "swarm": {"enabled": True, "subagent_model": "/nope"}}},
     "agent.swarm.subagent_model"),
    ({"warm_start": {"swarm": {"serial": 0.8, "parallel": 0.5}}}, "warm_start.swarm.parallel"),
    ({"warm_start": {"swarm": {"subagent_episodes": 1.0}}}, "warm_start.swarm.subagent_episodes"),
    ({"task": {"name": "browse"}}, "task.name"),
    # scale-out: engines must fit the bundles, a node must hold whole engines, colocated stays on a node
    ({"trainer": {"world_size": 2}, "rollout": {"num_engines": 3}}, "rollout.num_engines"),
    ({"trainer": {"world_size": 2}, "rollout": {"tensor_parallel_size": 2, "num_engines": 2}}, "rollout.num_engines"),
    ({"trainer": {"world_size": 4}, "rollout": {"tensor_parallel_size": 2}, "cluster": {"gpus_per_node": 3}},
     "cluster.gpus_per_node"),
    ({"trainer": {"world_size": 4}, "sync": {"transport": "colocated"}, "cluster": {"gpus_per_node": 2}},
     "sync.transport"),
    ({"cluster": {"placement": "scatter"}}, "cluster.placement"),
    ({"cluster": {"device": "cpu"}, "rollout": {"deterministic_sampling": True}}, "rollout.deterministic_sampling"),
    ({"task": {"name": "wide_search", "options": {"items": 30, "entities": 8}}}, "task.options"),
    ({"rewards": {"task_types": {"default": ["environment"]}}}, "rewards.task_types.default"),
    ({"agent": {"environment": "wide_search", "swarm": {"enabled": True, "budget_penalty": 1.0}}},
     "agent.swarm.budget_penalty"),
    ({"model": {"tokenizer": "bytes"}}, "model.tokenizer"),
    ({"trainer": {"qk_clip_tau": 0.0}}, "trainer.qk_clip_tau"),
    ({"rollout": {"tensor_parallel_size": 3}}, "rollout.tensor_parallel_size"),
    ({"rollout": {"samples_per_prompt": 1}}, "rollout.samples_per_prompt"),
    ({"trainer": {"lr": -1e-3}}, "trainer.lr"),
    ({"rollout": {"temperature": 0.0}}, "rollout.temperature"),
    ({"trainer": {"lr": "fast"}}, "trainer.lr"),
    ({"algorithm": {"objective": "ppo"}}, "algorithm.objective"),
    ({"algorithm": {"objective": "kimi_k25", "ratio_low": 2.0, "ratio_high": 2.0}}, "algorithm.ratio_low"),
    ({"algorithm": {"ratio_low": 0.0}}, "algorithm.ratio_low"),
    ({"algorithm": {"old_policy": "reference"}}, "algorithm.old_policy"),
    ({"algorithm": {"clip_low": 1.0}}, "algorithm.clip_low"),
    ({"algorithm": {"objective": "kimi_k2", "tis_cap": 2.0}}, "algorithm.tis_cap"),
    ({"algorithm": {"objective": "gspo", "loss_aggregation": "token_mean"}}, "algorithm.loss_aggregation"),
    ({"algorithm": {"loss_aggregation": "sum"}}, "algorithm.loss_aggregation"),
    ({"algorithm": {"max_sampling_rounds": 0}}, "algorithm.max_sampling_rounds"),
    ({"rollout": {"temperature_end": -1.0}}, "rollout.temperature_end"),
    ({"rollout": {"temperature_schedule": "step"}}, "rollout.temperature_schedule"),
    ({"rollout": {"max_new_tokens": -5}}, "rollout.max_new_tokens"),  # the K2 token budget
    ({"budget": {"length_penalty_weight": -0.1}}, "budget.length_penalty_weight"),
    ({"budget": {"toggle_phase_steps": 0}}, "budget.toggle_phase_steps"),
    ({"budget": {"toggle_percentile": 120}}, "budget.toggle_percentile"),
    ({"checkpoint": {"resume": "/no/such/checkpoint"}}, "checkpoint.resume"),
    ({"checkpoint": {"every": -1}}, "checkpoint.every"),
    ({"fault": {"max_restarts": -1}}, "fault.max_restarts"),
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(override)
    message = str(err.value)
    assert message.startswith(field + ":"), message
    assert "\n" not in message


def test_ptx_dataset_without_a_response_field_is_named(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=r"^ptx.path: .*demos.jsonl has no field 'response'"):
        load_config({"ptx": {"coef": 0.1, "path": str(data)}})
    with pytest.raises(ConfigError, match=r"^ptx.path: file does not exist"):
        load_config({"ptx": {"coef": 0.1, "path": str(tmp_path / "missing.jsonl")}})


def test_tp_checked_against_the_model_directory(random_model):
    # The random model has 4 heads and 2 key/value heads: TP=4 divides the heads but not the kv heads.
    with pytest.raises(ConfigError, match=r"^trainer.tensor_parallel_size: must divide the 2 key/value heads"):
        load_config({"model": {"path": random_model}, "trainer": {"tensor_parallel_size": 4}})
    # ... and its 2 layers bound the pipeline: PP=4 is larger than the layer count.
    with pytest.raises(ConfigError, match=r"^trainer.pipeline_parallel_size: larger than the 2 layers"):
        load_config({"model": {"path": random_model}, "trainer": {"pipeline_parallel_size": 4}})
    assert load_config({"model": {"path": random_model}, "trainer": {"tensor_parallel_size": 2}})


def test_an_unsupported_architecture_stops_before_anything_starts(tmp_path):
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"^model.path: unsupported architecture 'gemma3_text' \(supported: .*'qwen3'"):
        load_config({"model": {"path": str(tmp_path)}})


def test_default_config_is_valid():
    config = load_config({})
    assert config.rollout.samples_per_prompt >= 2 and config.model.path is None


@pytest.mark.parametrize("override, field", [
    ("model.path=/no/such/model", "model.path"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ("trainer.lr=-0.1", "trainer.lr"),
    ("trainer.tensor_parallel_size=3", "trainer.tensor_parallel_size"),
    ("algorithm.objective=ppo", "algorithm.objective"),
])
def test_cli_rejects_bad_config_before_starting_anything(override, field, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl.train", override, f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [l for l in lines if l.startswith("config error: " + field + ":")] and len(lines) == 1, proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("preset", ["agent_calculator", "swarm_wide_search"])
def test_agent_presets_load(preset):
    """The conf/ presets compose with Hydra and validate; their task comes from their environment."""
    from hydra import compose, initialize

    import rl.train  # noqa: F401 - registers the config schema with Hydra

    with initialize(config_path="../../conf", version_base="1.3"):
        config = load_config(compose(config_name=preset))
    assert config.agent.environment == config.task.name
    assert [s.name for s in config.rewards.task_types["default"]] == ["environment"]
    assert config.agent.swarm.enabled == (preset == "swarm_wide_search")


def test_the_smollm2_preset_replaces_the_demo_family(smollm2, monkeypatch):
    """conf/smollm2_math.yaml: the prepared SmolLM2 and the project's word problems; `addition: null`
    drops the demo family; `data.train_files` does the same in one argument."""
    from hydra import compose, initialize

    import rl.train  # noqa: F401 - registers the config schema with Hydra
    from rl.data.word_problems import write

    train, test = write(os.path.join(ROOT, ".cache", "data", "word_problems"))
    monkeypatch.chdir(ROOT)  # the preset's paths are relative to the repository
    with initialize(config_path="../../conf", version_base="1.3"):
        config = load_config(compose(config_name="smollm2_math"))
    assert list(config.data.families) == ["word_problems"] and config.model.path.endswith("smollm2-135m-instruct")
    assert [s.name for s in config.rewards.task_types["default"]] == ["math_verify"]
    one = load_config({"data": {"train_files": train, "val_files": test, "prompt_key": "messages"}})
    assert list(one.data.families) == ["train"] and one.data.families["train"].eval_path == test
    with pytest.raises(ConfigError, match="^data.val_files"):
        load_config({"data": {"val_files": test}})
