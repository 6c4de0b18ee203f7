"""Rewards inside the RL loop with the real engines: the policy judges its own samples (the
self-critique reward with the run's own SGLang engine as the judge) and, every step, the critic check
measures the judge's agreement with a verifiable reward and exports the pairs."""
import json
import string

import pytest

from rl.config import load_config
from rl.demo.tiny_model import create_tiny_qwen2

VERDICT = {"regex": r"\[\[(A|B|TIE)\]\]"}  # SGLang's constrained decoding: the tiny policy's verdicts parse


@pytest.mark.integration
def test_the_policy_judges_its_own_samples_and_the_critic_is_checked(tmp_path):
    import ray

    from rl.loop import run

    # a tiny random policy whose tokenizer covers the judge prompt (printable ASCII) and whose context
    # holds it (4096 positions)
    characters = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
    model = create_tiny_qwen2(str(tmp_path / "policy"), hidden_size=64, num_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, characters=characters,
                              max_position_embeddings=4096)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": p, "answer": "", "rubrics": ["Is short."]}) + "\n"
                            for p in ("Say hi.", "Name a color.", "Greet me.")))
    config = load_config({
        "steps": 2, "seed": 3, "model": {"path": model},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 3, "max_new_tokens": 8},
        "eval": {"every": 0}, "logging": {"wandb_mode": "disabled", "run_dir": str(tmp_path / "run")},
        "data": {"families": {"addition": {}, "chat": {"path": str(chat), "metadata_fields": ["rubrics"]}}},
        "rewards": {"task_types": {
            # verifiable (if arbitrary) for the additions: does the response contain a digit?
            "default": [{"name": "instruction_following", "kwargs": {"checks": [{"type": "regex", "pattern": "[0-9]"}]}}],
            "chat": [{"name": "self_critique", "kwargs": {"max_tokens": 8, "extra_body": VERDICT}}]}},
        "critic": {"every": 1, "task_types": ["addition"], "max_pairs": 4,
                   "judge": {"base_url": "policy", "max_tokens": 8, "extra_body": VERDICT}},
    })
    try:
        metrics = run(config, str(tmp_path / "run"))
    finally:
        ray.shutdown()

    assert len(metrics) == 2 and all(m["reward_failures"] == 0 for m in metrics)
    judged = [m for m in metrics if "reward/self_critique" in m]
    assert judged, "no chat prompt was drawn"
    for m in judged:  # K = 3: every response is in 2 pairs, each judged in both orders, all verdicts parse
        assert m["reward/self_critique/comparisons"] == 4.0 and m["reward/self_critique/unparseable"] == 0.0
        assert 0.0 <= m["reward/self_critique"] <= 1.0
    assert all("critic_pairs" in m and "critic_seconds" in m for m in metrics)
    checked = [m for m in metrics if m["critic_pairs"] > 0]
    assert checked, "no step had both a verified-correct and a verified-wrong response"
    for m in checked:
        assert 0.0 <= m["critic_agreement"] <= 1.0 and m["critic_unparseable"] == 0.0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "critic_pairs.jsonl")]
    assert len(rows) == sum(m["critic_pairs"] for m in metrics)
    assert all(len(r["verdicts"]) == 2 and r["task_type"] == "addition" for r in rows)
