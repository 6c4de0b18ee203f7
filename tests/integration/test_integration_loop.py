"""The colocated RL loop with the real engines: a local Ray cluster, Megatron-core, SGLang."""
import json
import math

import pytest

from rl.config import load_config
from tests.helpers import stub_calls

MISMATCH_TOLERANCE = 1e-3  # fp32 |SGLang logprob - trainer logprob| on every sampled token


def _run(demo_model, run_dir, **overrides):
    import ray

    from rl.loop import run

    config = load_config({
        "steps": 3, "model": {"path": demo_model},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4},
        "eval": {"every": 2, "prompts": 16},
        "logging": {"wandb_mode": "offline", "run_dir": str(run_dir)},
        **overrides,
    })
    try:
        return run(config, str(run_dir))
    finally:
        ray.shutdown()


def _check_steps(metrics, run_dir):
    assert len(metrics) == 3
    for i, m in enumerate(metrics, start=1):
        # SGLang's logprobs on the tokens it sampled, with the weights of the last sync, equal the trainer's.
        assert m["logprob_mismatch_max"] <= MISMATCH_TOLERANCE, m
        assert m["sample_weight_version"] == i - 1  # rollouts used the weights pushed after the previous step
        assert m["weight_version"] == i  # and every step pushes a new version
        assert 0.0 <= m["reward_mean"] <= 1.0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    lines = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    # Held-out accuracy before training, every `eval.every` steps, and at the last step.
    assert [l["step"] for l in lines if "eval_accuracy" in l] == [0, 2, 3]
    assert {"rollout_seconds", "reward_seconds", "train_seconds", "sync_seconds", "accuracy", "reward_mean",
            "response_length", "loss", "logprob_mismatch_max", "weight_version"} <= set(lines[1])
    assert list(run_dir.glob("wandb/offline-run-*")), "wandb offline run directory missing"


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["broadcast", "colocated"])
def test_rl_steps_keep_rollout_and_trainer_in_sync(demo_model, tmp_path, stub_log, transport):
    """Every sync goes through the checkpoint engine; `verify_full` compares every engine parameter with
    the trainer's after each push (gathered the simple way, not through the buckets)."""
    metrics = _run(demo_model, tmp_path, sync={"transport": transport, "verify_full": True, "bucket_mb": 0.05})
    _check_steps(metrics, tmp_path)
    assert all(m["sync_buckets"] > 1 and m["sync_bytes"] > 0 for m in metrics)  # several buckets per push
    assert stub_calls(stub_log) == []
