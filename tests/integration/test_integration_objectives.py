"""Every policy objective drives real RL steps (Ray, Megatron-core, SGLang) for two steps each, in one
engine session, under a decaying sampling temperature that the trainer's logprobs must follow, with
the PTX loss on a JSONL of demonstrations, two task families (one a JSONL prompt set with per-row
budgets, scored by math-verify beside a reward that hangs and one that raises) and, for one objective,
all of budget control."""
import json
import math

import pytest

from rl.algo.config import AlgorithmConfig, BudgetConfig
from rl.config import load_config

MISMATCH_TOLERANCE = 1e-3
CASES = [  # algorithm settings in the order they run, two steps each
    {"objective": "kimi_k2"},
    {"objective": "kimi_k25", "ratio_low": 0.5, "ratio_high": 2.0, "old_policy": "rollout"},
    {"objective": "grpo", "clip_high": 0.28, "filter_uniform_groups": True, "tis_cap": 2.0},  # DAPO-style
    {"objective": "ppo_clip", "loss_aggregation": "sequence_mean_token_mean"},
    {"objective": "gspo"},
]
# with ppo_clip: all of budget control (Toggle switches phase every step)
BUDGET = {"truncation_reward": -1.0, "length_penalty_weight": 0.1, "toggle": True, "toggle_phase_steps": 1,
          "toggle_estimate_prompts": 4}


@pytest.mark.integration
def test_each_objective_runs_two_steps_with_the_real_engines(demo_model, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.loop import RLLoop

    steps = 2 * len(CASES)
    prompt_set = tmp_path / "small.jsonl"
    prompt_set.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)[::-1], "kind": "small-sum",
                                              "budget": 3}) + "\n" for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)])
                          + '{"prompt": "9+9=", "answer": \n' + json.dumps({"prompt": "", "answer": "1", "kind": "small-sum",
                                                                           "budget": 3}) + "\n")  # two bad rows, skipped
    demonstrations = tmp_path / "curated.jsonl"  # the PTX data, alongside every objective
    demonstrations.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)[::-1]}) + "\n"
                                      for a, b in [(12, 30), (45, 9), (7, 7), (60, 21)]))
    config = load_config({
        "steps": steps, "model": {"path": demo_model},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "temperature": 1.3, "temperature_end": 0.7},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(tmp_path)},
        "ptx": {"coef": 0.1, "path": str(demonstrations), "samples_per_step": 4},
        # two task families: the generated additions, and a prompt set whose rows carry a type and a budget
        # (the prompt set samples at its own constant temperature, mixed in one batch with the others)
        "data": {"families": {"addition": {}, "small": {"path": str(prompt_set), "budget_field": "budget",
                                                        "type_field": "kind", "weight": 0.5, "temperature": 0.8}},
                 "on_bad_row": "skip"},
        # the prompt set's type is scored by math-verify; a reward that hangs (in a process, killed at its
        # timeout) and one that raises ride along at weight 0: their samples get the fallback and a reason
        "rewards": {"task_types": {"small-sum": [
            "math_verify", {"name": "tests.reward_plugins:hangs", "isolation": "process", "timeout_s": 0.5, "weight": 0.0},
            {"name": "tests.reward_plugins:raises", "weight": 0.0}]}},
    })
    engines = Actors.start(config, demo_model)
    try:
        loop = RLLoop(config, engines, AutoTokenizer.from_pretrained(demo_model))
        metrics, trained = [], []
        for case in CASES:
            loop.config.algorithm = AlgorithmConfig(**case)
            loop.config.budget = BudgetConfig(**BUDGET) if case["objective"] == "ppo_clip" else BudgetConfig()
            for _ in range(2):
                metrics.append((case["objective"], loop.step()))
                trained += loop.last_samples
    finally:
        engines.shutdown()
        ray.shutdown()

    for i, (objective, m) in enumerate(metrics):
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0, (objective, m)
        assert m["weight_version"] == i + 1 and m["sample_weight_version"] == i, (objective, m)
        # the linear decay from 1.3 to 0.7 over the run, and the trainer computed logprobs at each sample's
        # temperature (the mismatch covers both families' samples)
        assert m["temperature"] == pytest.approx(1.3 - 0.6 * i / steps), (objective, m)
        assert m["temperature/small"] == pytest.approx(0.8), (objective, m)
        assert m["logprob_mismatch_max"] <= MISMATCH_TOLERANCE, (objective, m)
        assert 0 < m["ptx_loss"] < 20, (objective, m)
        assert m["data_rows_skipped"] == 2, (objective, m)  # data.on_bad_row=skip: counted, and the run goes on
    grpo = [m for objective, m in metrics if objective == "grpo"]
    for m in grpo:  # dynamic sampling kept only groups with differing rewards, refilling when it could
        assert 1 <= m["sampling_rounds"] <= 3 and m["groups_trained"] <= 8
        assert m["groups_trained"] == 8 or m["sampling_rounds"] == 3
    assert len({round(m["loss"], 6) for _, m in metrics}) > len(CASES)  # the objectives differ
    assert [("toggle_zeroed" in m) for objective, m in metrics] == [objective == "ppo_clip" for objective, _ in metrics]
    assert loop.collector.budgets is not None  # estimated once, from the initial policy's samples
    assert {s.task_type for s in trained} == {"addition", "small-sum"}
    assert all(len(s.response_ids) <= s.max_new_tokens for s in trained)
    assert {s.max_new_tokens for s in trained if s.task_type == "small-sum"} == {3}  # the rows' own budget
    assert all(s.temperature == pytest.approx(0.8) for s in trained if s.family == "small")
    small = [s for s in trained if s.task_type == "small-sum"]
    for s in small:  # math-verify scored them; the hostile rewards fell back, each with its reason
        assert s.task_reward == s.reward_parts["math_verify"] and s.reward_parts["tests.reward_plugins:hangs"] == 0.0
        assert sorted(f.split(":")[1] for f in s.reward_failures) == ["hangs", "raises"], s.reward_failures
    assert all(s.reward_parts.keys() == {"exact_match"} for s in trained if s.task_type == "addition")
    with_small = [m for _, m in metrics if "reward/math_verify" in m]
    assert with_small and all(m["reward_timeouts"] >= 1 and m["reward_failures"] >= 2 for m in with_small)


@pytest.mark.integration
def test_partial_rollouts_continue_paused_responses_under_new_weights(demo_model, tmp_path):
    """K1.5 partial rollouts: a 2-token budget per round, responses of up to 8 tokens. A response paused
    in step n stays in the replay buffer and is completed in step n + 1 by the newly pushed weights; its
    tokens record both versions, and the older segment is left out of the loss."""
    import ray
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.loop import RLLoop

    config = load_config({
        "steps": 4, "model": {"path": demo_model},
        # the demo policy answers in 2 to 4 tokens and sometimes rambles to the 8-token budget, so
        # some groups complete in a step's second round while others are still paused
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 2, "max_new_tokens": 8,
                    "partial_segment_tokens": 2, "mask_old_segments": True},
        "algorithm": {"max_sampling_rounds": 1},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(tmp_path)},
    })
    engines = Actors.start(config, demo_model)
    try:
        loop = RLLoop(config, engines, AutoTokenizer.from_pretrained(demo_model))
        steps = []
        for _ in range(config.steps):
            metrics = loop.step()
            steps.append((metrics, loop.last_samples, set(loop.collector.in_flight)))
    finally:
        engines.shutdown()
        ray.shutdown()

    carried = []
    for n, (metrics, samples, _) in enumerate(steps):
        assert metrics["logprob_mismatch_max"] <= MISMATCH_TOLERANCE and math.isfinite(metrics["loss"])
        for s in samples:
            assert len(s.token_versions) == len(s.response_ids) == len(s.rollout_logprobs) <= 8
            assert s.token_versions == sorted(s.token_versions) and s.token_versions[-1] <= n
            assert s.finish_reason in ("stop", "length")  # trained only once finished (or at the full budget)
            assert s.loss_mask == [float(v == n) for v in s.token_versions]  # older segments left out
            if n and s.group_id in steps[n - 1][2] and set(s.token_versions) >= {n - 1, n}:
                carried.append(s)  # paused in step n - 1, completed in step n
        # a group is trained in the step its last response finished in (a sibling may have finished earlier)
        last = {}
        for s in samples:
            last[s.group_id] = max(last.get(s.group_id, -1), s.token_versions[-1])
        assert set(last.values()) == {n}, last
    assert carried, [m["groups_in_flight"] for m, _, _ in steps]
    assert sum(m["mixed_version_samples"] for m, _, _ in steps) >= len(carried)
