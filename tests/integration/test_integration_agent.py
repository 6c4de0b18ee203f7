"""PARL end to end with the real engines: the `swarm_wide_search` preset (a Megatron trainer, the
orchestrator's SGLang engine kept in sync, a second SGLang engine of frozen sub-agents) for two RL
steps on the wide-search task, with turn-level partial rollouts and a critical-steps budget."""
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
    from rollout.agents.swarm import SwarmSettings

    run_dir = str(tmp_path / "run")
    config, model_path = preset("swarm_wide_search", [
        "steps=2", "seed=1", "rollout.prompts_per_step=3", "rollout.samples_per_prompt=3",
        "agent.partial_tokens=300", "agent.swarm.max_critical_steps=5", "sync.verify_full=true", "logging.wandb_mode=disabled",
        f"logging.run_dir={run_dir}"])
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

    orchestrator_prompt = tokenizer.encode(SwarmSettings().system_prompt, add_special_tokens=False)
    runs = 0
    for batch, samples in zip(batches, trained):
        assert len(batch) == len(samples) == 3 * 3  # the orchestrator's episodes, nothing else
        for b, s in zip(batch, samples):
            assert b.agent is None and s.agent.stop  # no trace reaches the trainers; only finished episodes
            assert b.prompt_ids[: len(orchestrator_prompt)] == orchestrator_prompt
            assert b.response_ids == s.response_ids and b.loss_mask == s.loss_mask
            # the budget of 5 critical steps is checked before each turn; a stage costs at most 1 + 2
            assert s.agent.critical_steps <= 4 + 3
            assert s.agent.stop != "critical_steps" or s.agent.critical_steps >= 5
            # trained tokens: exactly the orchestrator's sampled turns; tool results (sub-agents' messages) masked
            sampled = [i for start, end in s.agent.turn_spans for i in range(start, end)]
            assert [i for i, m in enumerate(b.loss_mask) if m] == sampled
            for run in s.agent.subagents:
                runs += 1
                system = s.agent.created_subagents.get(run.agent, WideSearchEnvironment.system_prompt)
                assert tokenizer.decode(run.prompt_ids).startswith(system)  # its own episode, its own prompt
                assert run.steps >= 1 and run.response_ids
    assert runs > 0, "no sub-agent ran"

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("critical_steps", "total_steps", "subagents_per_stage", "r_parallel", "r_finish",
                    "lambda_parallel", "lambda_finish"):
            assert key in row, key
        assert 1 <= row["critical_steps"] <= row["total_steps"]
        assert 0 <= row["r_parallel"] <= 1 and 0 <= row["r_finish"] <= 1
    assert rows[1]["lambda_parallel"] < rows[0]["lambda_parallel"] == config.agent.swarm.lambda_parallel
    logged = [json.loads(line) for line in open(os.path.join(run_dir, "subagents.jsonl"))]
    assert len(logged) == runs and all(r["steps"] >= 1 for r in logged) and {r["step"] for r in logged} <= {1, 2}
