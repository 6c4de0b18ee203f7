"""SGLang's Engine on CPU: greedy continuations equal HF transformers', and no CPU stand-in is ever called."""
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from tests.conftest import stub_calls


@pytest.fixture(scope="module")
def engine_factory():
    engines = []

    def make(path):
        from rollout.sglang_engine import RolloutEngine

        engines.append(RolloutEngine(path, device="cpu", max_total_tokens=2048, seed=0))
        return engines[-1]

    yield make
    for e in engines:
        e.shutdown()


@pytest.mark.integration
def test_greedy_continuation_equals_hf(demo_model, engine_factory, stub_log):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    prompts = ["12+34=", "99+1=", "7+8=", "50+50=", "3+", "abc", "1", "88+88="]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    engine = engine_factory(demo_model)
    got = engine.generate_greedy(prompt_ids, max_new_tokens=10)

    hf = Qwen2ForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    for ids, sglang_ids in zip(prompt_ids, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert sglang_ids == out[0, len(ids):].tolist()
    assert stub_calls(stub_log) == []
