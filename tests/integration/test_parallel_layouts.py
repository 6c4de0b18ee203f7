"""Every parallel layout computes what one process computes: logprobs, loss, gradients and the global
gradient norm equal the single-process run within fp32 tolerance, and the weights gathered back to HF
are bitwise the weights loaded (HF -> Megatron shards -> HF round trip).

The reference runs the whole minibatch as one micro-batch; the layouts use a small token budget, so
gradient accumulation over several micro-batches is checked too.
"""
import pytest
import torch
import torch.multiprocessing as mp

from rl.algo.advantages import group_advantages
from rl.sample import Sample
from rl.trainer.setup import load_hf_state_dict

TOLERANCE = 2e-5


def _samples() -> list[Sample]:
    """Four prompt groups of three responses of different lengths, with varied rewards."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for group in range(4):
        prompt = torch.randint(2, 64, (3 + group,), generator=g).tolist()
        for k in range(3):
            response = torch.randint(2, 64, (2 + k,), generator=g).tolist()
            samples.append(Sample(group_id=group, prompt="", prompt_ids=prompt, reference="",
                                  response_ids=response, reward=float(k == group % 3)))
    group_advantages(samples)
    return samples


def _worker(rank, world_size, model_path, port, layout, out_path):
    from rl.algo.objectives import ObjectiveSettings
    from tests.helpers import make_engine

    engine = make_engine(model_path, rank=rank, world_size=world_size, master_port=port, device="cpu", **layout)
    samples = _samples()
    logprobs = engine.compute_logprobs(samples)
    for s, lp in zip(samples, logprobs):
        s.old_logprobs = [x - 0.01 for x in lp]  # a nonzero log-ratio, so the tau term has a gradient
    loss = engine.compute_gradients(samples, ObjectiveSettings(tau=0.5))["loss"]
    norm = engine.grad_norm()
    grads, weights = engine.hf_grad_dict(), engine.hf_state_dict()
    if rank == 0:
        torch.save({"logprobs": logprobs, "loss": loss, "norm": norm, "grads": grads, "weights": weights}, out_path)
    engine.shutdown()


def run_layout(model_path, world_size, port, tmp_path, **layout):
    out = tmp_path / f"result_{world_size}_{sorted(layout.items())}.pt"
    mp.start_processes(_worker, args=(world_size, model_path, port, layout, str(out)), nprocs=world_size,
                       join=True, start_method="spawn")
    return torch.load(out)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> str:
    from rl.demo.tiny_model import create_tiny_qwen2

    return create_tiny_qwen2(str(tmp_path_factory.mktemp("tied-qwen2")), hidden_size=64, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, seed=5,
                             tie_word_embeddings=True)


_REFERENCES: dict = {}


def _reference(model_path, port, tmp_path):
    if model_path not in _REFERENCES:
        _REFERENCES[model_path] = run_layout(model_path, 1, port, tmp_path, micro_batch_tokens=10**6)
    return _REFERENCES[model_path]


def _assert_same(got, ref, source):
    assert max(abs(a - b) for x, y in zip(got["logprobs"], ref["logprobs"]) for a, b in zip(x, y)) <= TOLERANCE
    assert got["loss"] == pytest.approx(ref["loss"], abs=TOLERANCE)
    assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        assert (got["grads"][name] - grad).abs().max().item() <= TOLERANCE, name
    assert got["weights"].keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(got["weights"][name], tensor), name


@pytest.mark.multiproc
@pytest.mark.parametrize("name, layout", [
    ("TP=2", dict(tensor_parallel_size=2)),
    ("PP=2", dict(pipeline_parallel_size=2)),
    ("DP=2", dict()),
    ("TP=2, vocab padded 64 -> 96", dict(tensor_parallel_size=2, vocab_pad_multiple=48)),
])
def test_two_process_layout_equals_one_process(random_model, free_port, tmp_path, name, layout):
    ref = _reference(random_model, free_port, tmp_path)
    assert ref["norm"] > 0
    got = run_layout(random_model, 2, free_port + 1, tmp_path, micro_batch_tokens=40, **layout)
    _assert_same(got, ref, load_hf_state_dict(random_model))


@pytest.mark.multiproc
def test_pipeline_with_tied_embeddings_equals_one_process(tied_model, free_port, tmp_path):
    """The last stage holds a copy of the tied embeddings; their gradients are summed across stages."""
    ref = _reference(tied_model, free_port, tmp_path)
    got = run_layout(tied_model, 2, free_port + 1, tmp_path, micro_batch_tokens=40, pipeline_parallel_size=2)
    _assert_same(got, ref, load_hf_state_dict(tied_model))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict:
    from rl.demo.tiny_model import create_tiny_deepseek_v3, create_tiny_qwen3_moe

    return {"qwen3_moe": create_tiny_qwen3_moe(str(tmp_path_factory.mktemp("qwen3-moe"))),
            "deepseek_v3": create_tiny_deepseek_v3(str(tmp_path_factory.mktemp("deepseek-v3")))}


@pytest.mark.multiproc
@pytest.mark.parametrize("arch, layout", [
    ("qwen3_moe", dict(expert_parallel_size=2)),
    ("qwen3_moe", dict(tensor_parallel_size=2)),  # MoE under TP runs with sequence parallelism
    ("qwen3_moe", dict(pipeline_parallel_size=2)),
    ("deepseek_v3", dict(expert_parallel_size=2)),  # MLA + shared expert + grouped sigmoid routing
])
def test_moe_layout_equals_one_process(moe_models, free_port, tmp_path, arch, layout):
    ref = _reference(moe_models[arch], free_port, tmp_path)
    got = run_layout(moe_models[arch], 2, free_port + 1, tmp_path, micro_batch_tokens=40, **layout)
    _assert_same(got, ref, load_hf_state_dict(moe_models[arch]))


def test_bad_layout_fails_before_any_process_group():
    import torch.distributed as dist

    from rl.trainer.parallel_layout import LayoutError
    from tests.helpers import make_engine

    with pytest.raises(LayoutError, match=r"^trainer.tensor_parallel_size: must divide the 4 attention heads \(got 3\)$"):
        make_engine(_tiny_path(), world_size=3, tensor_parallel_size=3, device="cpu")
    assert not dist.is_initialized()


def _tiny_path():
    import tempfile

    from rl.demo.tiny_model import create_tiny_qwen2

    return create_tiny_qwen2(tempfile.mkdtemp(), hidden_size=32, num_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=48)


@pytest.mark.parametrize("layout, message", [
    (dict(world_size=3, pipeline_parallel_size=3), "pipeline_parallel_size: larger than the 2 layers"),
    (dict(world_size=4, expert_parallel_size=2), "expert_parallel_size: the model has no experts"),
    (dict(world_size=3, tensor_parallel_size=2), "world_size: must be a multiple of"),
])
def test_layout_check_names_the_setting(layout, message):
    from rl.trainer.parallel_layout import LayoutError, ParallelLayout

    with pytest.raises(LayoutError, match=message):
        ParallelLayout(**layout).check(num_layers=2, num_heads=4, num_kv_heads=2)


def test_expert_parallel_must_divide_experts_and_data_parallel():
    from rl.trainer.parallel_layout import LayoutError, ParallelLayout

    with pytest.raises(LayoutError, match="expert_parallel_size: must divide the 6 experts"):
        ParallelLayout(world_size=4, expert_parallel_size=4).check(num_layers=2, num_heads=4, num_kv_heads=2, num_experts=6)
    with pytest.raises(LayoutError, match="tensor_parallel_size: multi-latent attention needs Transformer Engine"):
        ParallelLayout(world_size=2, tensor_parallel_size=2).check(num_layers=2, num_heads=4, num_kv_heads=4,
                                                                   num_experts=4, latent_attention=True)
    with pytest.raises(LayoutError, match="expert_parallel_size: must divide the data-parallel size 1"):
        ParallelLayout(world_size=2, tensor_parallel_size=2, expert_parallel_size=2).check(
            num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4)
