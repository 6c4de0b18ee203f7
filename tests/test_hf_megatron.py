"""HF <-> Megatron conversion: the round trip is bitwise identical for every TP layout."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl.hf_megatron import Geometry, hf_to_megatron, megatron_to_hf


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("heads, kv_heads, tp", [(4, 2, 1), (4, 2, 2), (8, 4, 4), (4, 4, 2)])
def test_round_trip_is_bitwise(heads, kv_heads, tp, tied):
    config = Qwen2Config(vocab_size=64, hidden_size=8 * heads, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=48, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(config).state_dict()
    if tied:
        hf.pop("lm_head.weight", None)
    g = Geometry.from_hf(config)
    shards = [hf_to_megatron(hf, g, rank, tp) for rank in range(tp)]
    back = megatron_to_hf(shards, g)
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_layout_groups_queries_with_their_key_value_head():
    """Megatron's fused QKV is [q of group g | k of g | v of g] per key/value group."""
    config = Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=8)
    g = Geometry.from_hf(config)
    hd = g.head_dim
    hf = {k: torch.zeros_like(v) for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    attn = "model.layers.0.self_attn."
    hf[attn + "q_proj.weight"] = torch.arange(4 * hd).float()[:, None].expand(-1, 16).clone()
    hf[attn + "k_proj.weight"] = 100 + torch.arange(2 * hd).float()[:, None].expand(-1, 16).clone()
    hf[attn + "v_proj.weight"] = 200 + torch.arange(2 * hd).float()[:, None].expand(-1, 16).clone()
    qkv = hf_to_megatron(hf, g)["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0]
    group0 = torch.cat([torch.arange(2 * hd).float(), 100 + torch.arange(hd).float(), 200 + torch.arange(hd).float()])
    assert torch.equal(qkv[: 4 * hd], group0)
    # TP rank 1 of 2 holds exactly key/value group 1.
    rank1 = hf_to_megatron(hf, g, tp_rank=1, tp_size=2)["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0]
    assert torch.equal(rank1, qkv[4 * hd:])
