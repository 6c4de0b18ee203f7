"""Every policy objective drives real RL steps (Ray, Megatron-core, SGLang) for two steps each, in one
engine session, under a decaying sampling temperature that the trainer's logprobs must follow."""
import math

import pytest

from rl.config import AlgorithmConfig, load_config

MISMATCH_TOLERANCE = 1e-3
CASES = [  # (objective settings, steps) in the order they run; two steps each
    {"objective": "kimi_k2"},
    {"objective": "kimi_k25", "ratio_low": 0.5, "ratio_high": 2.0, "old_policy": "rollout"},
    {"objective": "grpo", "clip_high": 0.28, "filter_uniform_groups": True, "tis_cap": 2.0},  # DAPO-style
    {"objective": "ppo_clip", "loss_aggregation": "sequence_mean_token_mean"},
    {"objective": "gspo"},
]


@pytest.mark.integration
def test_each_objective_runs_two_steps_with_the_real_engines(demo_model, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from rl.loop import Engines, RLLoop

    steps = 2 * len(CASES)
    config = load_config({
        "steps": steps, "model": {"path": demo_model},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "temperature": 1.3, "temperature_end": 0.7},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(tmp_path)},
    })
    engines = Engines.start(config, demo_model)
    try:
        loop = RLLoop(config, engines, AutoTokenizer.from_pretrained(demo_model))
        metrics = []
        for case in CASES:
            loop.config.algorithm = AlgorithmConfig(**case)
            metrics += [(case["objective"], loop.step()), (case["objective"], loop.step())]
    finally:
        engines.shutdown()
        ray.shutdown()

    for i, (objective, m) in enumerate(metrics):
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0, (objective, m)
        assert m["weight_version"] == i + 1 and m["sample_weight_version"] == i, (objective, m)
        # the linear decay from 1.3 to 0.7 over the run, and the trainer computed logprobs at that temperature
        assert m["temperature"] == pytest.approx(1.3 - 0.6 * i / steps), (objective, m)
        assert m["logprob_mismatch_max"] <= MISMATCH_TOLERANCE, (objective, m)
    grpo = [m for objective, m in metrics if objective == "grpo"]
    for m in grpo:  # dynamic sampling kept only groups with differing rewards, refilling when it could
        assert 1 <= m["sampling_rounds"] <= 3 and m["groups_trained"] <= 8
        assert m["groups_trained"] == 8 or m["sampling_rounds"] == 3
    assert len({round(m["loss"], 6) for _, m in metrics}) > len(CASES)  # the objectives differ
