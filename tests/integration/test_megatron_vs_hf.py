"""Megatron-core's logits on CPU equal HF transformers' for the same weights, for TP=1 and TP=2 (gloo),
on the tiny random Qwen2 and on the real SmolLM2-135M-Instruct (Llama, tied embeddings, 9 heads)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

TOLERANCE = 1e-4


def _worker(rank, world_size, model_path, port, input_ids, perturb, out_path):
    from tests.helpers import make_engine

    engine = make_engine(model_path, rank=rank, world_size=world_size, master_port=port,
                            tensor_parallel_size=world_size, device="cpu")
    if perturb:  # a wrong weight must be detected: the check is not vacuous
        with torch.no_grad():
            engine.model.decoder.layers[0].mlp.linear_fc2.weight.add_(1e-2)
    with torch.no_grad():
        local = engine.logits(input_ids)  # [b, s, vocab / TP]
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    if rank == 0:
        torch.save(torch.cat(parts, dim=-1), out_path)
    engine.shutdown()


def _megatron_logits(model_path, tp, input_ids, port, tmp_path, perturb=False):
    out = tmp_path / f"logits_tp{tp}_{perturb}.pt"
    mp.start_processes(_worker, args=(tp, model_path, port, input_ids, perturb, str(out)), nprocs=tp,
                       join=True, start_method="spawn")
    return torch.load(out)


def _hf_logits(model_path, input_ids):
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids).logits


def _max_difference(model_path, tp, input_ids, port, tmp_path, perturb=False) -> tuple[float, float]:
    """max |Megatron - HF| over the logits, and max |HF logit| (for a relative bound)."""
    expected = _hf_logits(model_path, input_ids)
    got = _megatron_logits(model_path, tp, input_ids, port, tmp_path, perturb)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item(), expected.abs().max().item()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_equal_hf(random_model, tp, free_port, tmp_path):
    torch.manual_seed(0)
    input_ids = torch.randint(2, 64, (3, 17))
    assert _max_difference(random_model, tp, input_ids, free_port, tmp_path)[0] <= TOLERANCE


@pytest.mark.multiproc
def test_logit_comparison_detects_a_wrong_weight(random_model, free_port, tmp_path):
    input_ids = torch.randint(2, 64, (2, 9))
    assert _max_difference(random_model, 2, input_ids, free_port, tmp_path, perturb=True)[0] > TOLERANCE


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 3])
def test_megatron_logits_equal_hf_on_smollm2(smollm2, tp, free_port, tmp_path):
    """A real pretrained checkpoint: TP=3 splits its 9 query and 3 key/value heads."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    texts = ["What is 12 + 7?", "The capital of France is", "def add(a, b):\n    return"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = min(len(r) for r in rows)
    input_ids = torch.tensor([r[:width] for r in rows])
    difference, scale = _max_difference(smollm2, tp, input_ids, free_port, tmp_path)
    assert difference <= TOLERANCE * scale


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_equal_hf_on_a_dense_qwen3(tp, free_port, tmp_path):
    """Qwen3 dense: per-head q/k RMSNorm (scaled away from 1, so a missing norm shows), head_dim 32."""
    from rl.demo.tiny_model import create_tiny_qwen3

    path = create_tiny_qwen3(str(tmp_path / "qwen3"), seed=5)
    torch.manual_seed(0)
    input_ids = torch.randint(2, 64, (3, 13))
    assert _max_difference(path, tp, input_ids, free_port, tmp_path)[0] <= TOLERANCE


def _logprob_worker(rank, world_size, model_path, port, sequences, out_path):
    from rl.sample import Sample
    from tests.helpers import make_engine

    engine = make_engine(model_path, rank=rank, world_size=world_size, master_port=port, device="cpu",
                         tensor_parallel_size=world_size, vocab_pad_multiple=48 if world_size > 1 else 1)
    samples = [Sample(group_id=i, prompt="", prompt_ids=p, reference="", response_ids=r, temperature=t)
               for i, (p, r, t) in enumerate(sequences)]
    logprobs = engine.compute_logprobs(samples)
    if rank == 0:
        torch.save(logprobs, out_path)
    engine.shutdown()


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])  # TP=2 pads the vocabulary 64 -> 96: the masked-logits path
def test_response_logprobs_equal_hf_log_softmax_at_each_temperature(random_model, tp, free_port, tmp_path):
    """The trainer keeps only the positions that predict response tokens and divides the output layer's
    input by the temperature (rl/trainer/response_logits.py): its logprobs still equal HF's
    log_softmax(logits / T) of each sampled token, with prompts of different lengths in one batch."""
    torch.manual_seed(1)
    sequences = [(torch.randint(2, 64, (n,)).tolist(), torch.randint(2, 64, (m,)).tolist(), t)
                 for n, m, t in [(3, 6, 1.0), (9, 2, 0.7), (5, 5, 1.3)]]
    out = tmp_path / "logprobs.pt"
    mp.start_processes(_logprob_worker, args=(tp, random_model, free_port, sequences, str(out)), nprocs=tp,
                       join=True, start_method="spawn")
    got = torch.load(out)
    for (prompt, response, t), lp in zip(sequences, got):
        logits = _hf_logits(random_model, torch.tensor([prompt + response]))[0, len(prompt) - 1:-1] / t
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lp), expected, atol=TOLERANCE), (t, lp, expected.tolist())
