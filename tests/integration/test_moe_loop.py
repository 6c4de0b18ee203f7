"""Routing replay in the RL loop with the real engines: multi-turn tool episodes of the tiny Qwen3-MoE,
served in bf16, paused at turn boundaries and continued under new weights (turn-level partial
rollouts), trained in fp32 with `routing_replay: rollout`; each push into the bf16 engine is verified."""
import numpy as np
import pytest

from tests.helpers import preset, run_loop_recording


@pytest.mark.integration
def test_episodes_carry_their_turns_routing_and_the_trainer_replays_it(tmp_path):
    run_dir = str(tmp_path / "run")
    config, model_path = preset("agent_calculator", [
        "steps=3", "algorithm.max_sampling_rounds=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "model.architecture=qwen3_moe", "rollout.dtype=bfloat16", "rollout.return_routing=true",
        "algorithm.routing_replay=rollout", "agent.partial_tokens=30", "sync.verify_full=true",
        "logging.wandb_mode=disabled", f"logging.run_dir={run_dir}"])
    run = run_loop_recording(config, model_path, run_dir)
    batches, metrics = run["batches"], run["metrics"]

    samples = [s for batch in batches for s in batch]
    assert samples and any(0 in s.loss_mask for s in samples), "no episode called a tool"
    for s in samples:  # every input position: the policy's own tokens routed by the engine, tool results not
        start, covered = len(s.prompt_ids), len(s.routed_experts)
        assert s.routed_experts.shape[1:] == (2, 2) and covered <= len(s.tokens) - 1
        # an episode that ends on a tool result (its turns used up) has no later turn to report the
        # positions from its last sampled token on; they are left to the trainer, as tool results are
        assert all(s.loss_mask[p - start] == 0 for p in range(covered + 1, len(s.tokens) - 1))
        policy = start + np.flatnonzero(np.asarray(s.loss_mask[:len(s.routed_experts) - start]) == 1)
        tools = start + np.flatnonzero(np.asarray(s.loss_mask[:len(s.routed_experts) - start]) == 0)
        assert (s.routed_experts[:start] >= 0).all() and (s.routed_experts[policy] >= 0).all()
        assert (s.routed_experts[tools] == -1).all()
    assert any(len(set(s.token_versions)) > 1 for s in samples), "no episode continued under new weights"
    for m in metrics:  # the trainer routed every replayed token as the engine did (the logprob mismatch itself
        # is large here: SGLang reports the format-constrained distribution's logprobs, README's PARL section)
        assert m["routing_diff_share"] == 0 and np.isfinite(m["mismatch_k3_kl"])
