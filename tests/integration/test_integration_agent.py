"""PARL end to end with the real engines: the `swarm_wide_search` preset (a Megatron trainer, the
orchestrator's SGLang engine kept in sync, a second SGLang engine of frozen sub-agents) for two RL
steps on the wide-search task, with turn-level partial rollouts and a critical-steps budget, from the
preset's warm-started model, which writes the tool protocol without constrained decoding."""
import json
import os

import pytest

from tests.helpers import preset, run_loop_recording


@pytest.mark.integration
def test_parl_trains_the_orchestrator_and_leaves_the_subagents_frozen(tmp_path):
    import ray
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rollout.agents.environments.knowledge_base import WideSearchEnvironment

    run_dir = str(tmp_path / "run")
    config, model_path = preset("swarm_wide_search", [
        "steps=2", "seed=1", "rollout.prompts_per_step=3", "rollout.samples_per_prompt=3",
        "agent.partial_tokens=300", "eval.prompts=6", "sync.verify_full=true",
        "logging.wandb_mode=disabled", f"logging.run_dir={run_dir}"])
    initial = load_file(os.path.join(model_path, "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def verify(engines):  # each engine's weights against the initial ones: names of those that changed
        return [ray.get(group.engines[0].verify_weights.remote(initial), timeout=120)
                for group in (engines.subagents, engines.rollout)]

    run = run_loop_recording(config, model_path, run_dir, verify)
    batches, trained = run["batches"], run["trained"]
    subagent_changed, policy_changed = run["checked"]

    # the sub-agents' engine kept the fixed checkpoint; the orchestrator's engine took every update (and
    # sync.verify_full checked it equals the trainer's weights after each push)
    assert subagent_changed == [] and len(policy_changed) > 0

    assert not config.agent.constrain_format
    orchestrator_prompt = tokenizer.encode(config.agent.swarm.system_prompt, add_special_tokens=False)
    runs = answered = looked_up = 0
    for batch, samples in zip(batches, trained):
        assert len(batch) == len(samples) == 3 * 3  # the orchestrator's episodes, nothing else
        for b, s in zip(batch, samples):
            assert b.agent is None and s.agent.stop  # no trace reaches the trainers; only finished episodes
            assert b.prompt_ids[: len(orchestrator_prompt)] == orchestrator_prompt
            assert b.response_ids == s.response_ids and b.loss_mask == s.loss_mask
            # the preset's budget of 8 critical steps is checked before each turn; a stage costs at most 1 + 2
            budget = config.agent.swarm.max_critical_steps
            assert s.agent.critical_steps <= budget - 1 + 3
            assert s.agent.stop != "critical_steps" or s.agent.critical_steps >= budget
            # trained tokens: exactly the orchestrator's sampled turns; tool results (sub-agents' messages) masked
            sampled = [i for start, end in s.agent.turn_spans for i in range(start, end)]
            assert [i for i, m in enumerate(b.loss_mask) if m] == sampled
            for run in s.agent.subagents:
                runs += 1
                system = s.agent.created_subagents.get(run.agent, WideSearchEnvironment.system_prompt)
                assert tokenizer.decode(run.prompt_ids).startswith(system)  # its own episode, its own prompt
                assert run.steps >= 1 and run.response_ids
                looked_up += run.message == s.agent.env.base.get(run.prompt.split(" of ")[-1], {}).get(
                    run.prompt.split(" of ")[0])
            answered += s.agent.env_reward > 0
    # the warm start writes the protocol unconstrained: its sub-agents run, and some episodes get items right
    assert runs > 0, "no sub-agent ran"
    assert looked_up > 0, "no sub-agent answered its task right"
    assert answered > 0, "no episode got an item right"

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("critical_steps", "total_steps", "subagents_per_stage", "r_parallel", "r_finish",
                    "lambda_parallel", "lambda_finish"):
            assert key in row, key
        assert 1 <= row["critical_steps"] <= row["total_steps"]
        assert 0 <= row["r_parallel"] <= 1 and 0 <= row["r_finish"] <= 1
    assert rows[1]["lambda_parallel"] < rows[0]["lambda_parallel"] == config.agent.swarm.lambda_parallel
    # the last step's held-out episodes: item F1 and the swarm's statistics
    for key in ("eval_accuracy", "eval_subagents", "eval_subagents_per_stage", "eval_critical_steps",
                "eval_episode_seconds", "eval_solved"):
        assert key in rows[1] and key not in rows[0], key
    assert 0 <= rows[1]["eval_accuracy"] <= 1 and rows[1]["eval_episode_seconds"] > 0
    logged = [json.loads(line) for line in open(os.path.join(run_dir, "subagents.jsonl"))]
    assert len(logged) == runs and all(r["steps"] >= 1 for r in logged) and {r["step"] for r in logged} <= {1, 2}
