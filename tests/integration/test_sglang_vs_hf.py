"""SGLang's Engine on CPU: greedy continuations equal HF transformers', no CPU stand-in is ever called,
and the CPU accommodations of rollout/sglang/cpu.py are in place."""
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from tests.helpers import stub_calls


@pytest.fixture(scope="module")
def engine_factory():
    engines = {}  # one engine per model for the whole module (each start costs about 25 s)

    def make(path):
        from rollout.config import RolloutConfig
        from rollout.sglang.engine import RolloutEngine

        if path not in engines:
            engines[path] = RolloutEngine(path, RolloutConfig(max_total_tokens=2048), device="cpu", seed=0)
        return engines[path]

    yield make
    for e in engines.values():
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


@pytest.mark.integration
def test_cpu_schedulers_froze_their_start_up_objects(demo_model, engine_factory):
    """rollout/sglang/cpu.freeze_gc ran in the scheduler, so SGLang's per-flush gc.collect() skips its
    start-up heap (which cost 0.35 s per weight push); flushing still works."""
    engine = engine_factory(demo_model)
    assert len(engine.frozen_objects) == 1 and engine.frozen_objects[0] > 10_000, engine.frozen_objects
    assert engine.engine.flush_cache().success


@pytest.mark.integration
def test_greedy_continuation_equals_hf_on_a_dense_qwen3(engine_factory, tmp_path):
    """Qwen3 dense (per-head q/k norms) in SGLang, as the trainer supports it: the same greedy tokens as HF."""
    from transformers import AutoModelForCausalLM

    from rl.demo.tiny_model import create_tiny_qwen3

    path = create_tiny_qwen3(str(tmp_path / "qwen3"), seed=5)
    prompt_ids = [[5, 9, 14, 3], [20, 21], [7, 7, 7, 30, 41]]
    got = engine_factory(path).generate_greedy(prompt_ids, max_new_tokens=8)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for ids, sglang_ids in zip(prompt_ids, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                              pad_token_id=0, eos_token_id=None)
        assert sglang_ids and sglang_ids[:8] == out[0, len(ids):].tolist()[:len(sglang_ids)]


@pytest.mark.integration
def test_the_samples_of_a_prompt_read_it_from_the_prefix_cache(demo_model, engine_factory):
    """rollout.prefill_shared_prompts: once a weight update has emptied the prefix cache, a prompt that
    several samples share is prefilled once and each of them finds it cached; without that, the copies
    arriving together each prefill it (SGLang's default first-come scheduling)."""
    from rl.sample import Sample

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    shared, single = tokenizer.encode("12+34="), tokenizer.encode("7+8=")
    samples = [Sample(group_id=0, prompt="", prompt_ids=shared, reference="") for _ in range(4)]
    samples.append(Sample(group_id=1, prompt="", prompt_ids=single, reference=""))
    engine = engine_factory(demo_model)

    def cached_tokens(prefill: bool) -> list[int]:
        assert engine.engine.flush_cache().success
        if prefill:
            engine.prefill_shared(samples)
        outs = engine.engine.generate(input_ids=[s.prompt_ids for s in samples], sampling_params={"max_new_tokens": 1})
        return [o["meta_info"]["cached_tokens"] for o in outs]

    assert cached_tokens(prefill=False) == [0] * 5
    with_prefill = cached_tokens(prefill=True)
    assert all(n >= len(shared) - 1 for n in with_prefill[:4]) and with_prefill[4] == 0, with_prefill
    assert engine.prefill_shared_prompts  # the default: RolloutEngine.generate does this for every batch
