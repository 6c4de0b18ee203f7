"""HF <-> full Megatron conversion of dense Qwen2/Llama weights: exact round trip and the fused layouts."""
import pytest
import torch
from transformers import AutoConfig

from rl.trainer.models.dense import Geometry, full_to_hf, hf_to_full
from rl.trainer.setup import load_hf_state_dict


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bitwise_identical(random_model, tied):
    hf = load_hf_state_dict(random_model)
    g = Geometry.from_hf(AutoConfig.from_pretrained(random_model))
    if tied:
        g = Geometry(**{**g.__dict__, "tied_embeddings": True})
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    back = full_to_hf(hf_to_full(hf, g), g)
    assert back.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_fused_qkv_groups_query_heads_with_their_key_value_head(random_model):
    hf = load_hf_state_dict(random_model)
    g = Geometry.from_hf(AutoConfig.from_pretrained(random_model))  # 4 heads, 2 kv groups, head_dim 16
    d = g.head_dim
    qkv = hf_to_full(hf, g)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    # group 0 = [q heads 0,1 | k head 0 | v head 0], then group 1
    assert torch.equal(qkv[: 2 * d], q[: 2 * d])
    assert torch.equal(qkv[2 * d : 3 * d], k[:d])
    assert torch.equal(qkv[3 * d : 4 * d], v[:d])
    assert torch.equal(qkv[4 * d : 6 * d], q[2 * d :])
    fc1 = hf_to_full(hf, g)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]]))
