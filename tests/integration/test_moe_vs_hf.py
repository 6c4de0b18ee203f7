"""MoE architectures: Megatron-core's logits on CPU equal HF transformers' for the same weights.

DeepSeek-V3 (Kimi K2's architecture: MLA, a dense first layer, routed + shared experts, sigmoid
group-limited routing with a correction bias) and Qwen3-MoE (GQA with q/k norms, softmax top-k), at
EP=1 in one process and at EP=2 in two (allgather token dispatcher, gloo). The HF <-> full Megatron
conversion must also round-trip bitwise.
"""
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import pick_port

TOLERANCE = 1e-4
ARCHITECTURES = ["deepseek_v3", "deepseek_v3_half_split_rope", "qwen3_moe"]
EP2_ARCHITECTURES = ["deepseek_v3", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, str]:
    from rl.demo.tiny_model import create_tiny_deepseek_v3, create_tiny_qwen3_moe

    root = tmp_path_factory.mktemp("moe-models")
    return {
        "deepseek_v3": create_tiny_deepseek_v3(str(root / "deepseek_v3"), seed=1),
        # HF's other rotary layout: the conversion permutes the rotary rows for Megatron.
        "deepseek_v3_half_split_rope": create_tiny_deepseek_v3(str(root / "deepseek_v3_hs"), seed=2,
                                                               rope_interleave=False),
        "qwen3_moe": create_tiny_qwen3_moe(str(root / "qwen3_moe"), seed=3),
    }


def _input_ids() -> torch.Tensor:
    return torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(0))


def _hf_logits(path: str, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def _expert_shard(full: dict, ep_rank: int, ep_size: int, experts: int) -> dict:
    """This EP rank's part of the full state: experts [r*E/ep, (r+1)*E/ep), renumbered from 0."""
    per_rank = experts // ep_size
    out = {}
    for name, tensor in full.items():
        match = re.search(r"\.local_experts\.(\d+)\.", name)
        if match is None:
            out[name] = tensor
            continue
        e = int(match.group(1))
        if ep_rank * per_rank <= e < (ep_rank + 1) * per_rank:
            out[name[: match.start(1)] + str(e - ep_rank * per_rank) + name[match.end(1):]] = tensor
    return out


def _megatron_results(model, model_path, input_ids, world_size) -> dict:
    from megatron.core import parallel_state as ps

    from rl.trainer.models.moe import hf_to_full, num_experts

    hf_config = AutoConfig.from_pretrained(model_path)
    full = hf_to_full(load_file(f"{model_path}/model.safetensors"), hf_config)
    shard = _expert_shard(full, ps.get_expert_model_parallel_rank(), world_size, num_experts(hf_config))
    missing, unexpected = model.load_state_dict(shard, strict=False)  # shape mismatches raise here
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, f"missing={missing} unexpected={unexpected}"

    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
    result = {"logits": logits,
              "not_allreduced": sorted(n for n, p in model.named_parameters() if not getattr(p, "allreduce", True))}
    if world_size == 1:
        # backward runs on CPU through MLA / experts / router, and reaches the experts' weights
        model.train()
        model(input_ids=input_ids, position_ids=positions, attention_mask=None).float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        result["grads_finite"] = all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())
        result["grads_missing"] = sorted(n for n, g in grads.items() if g is None)
        expert_grads = [g for n, g in grads.items() if ".local_experts." in n and g is not None]
        result["some_expert_grad_nonzero"] = any(bool(g.abs().sum() > 0) for g in expert_grads)
        # a wrong expert weight must be detected: the comparison is not vacuous
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".local_experts." in name and name.endswith("linear_fc2.weight"):
                    param.add_(1e-2)
            model.eval()
            result["perturbed"] = model(input_ids=input_ids, position_ids=positions, attention_mask=None)
    return result


def _worker(rank, world_size, model_paths, port, input_ids, out_path):
    """One rank: build and load every model in `model_paths` (one process start for all of them)."""
    from megatron.core import parallel_state as ps

    from rl.trainer import megatron_cpu
    from rl.trainer.models.moe import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world_size)
    megatron_cpu.patch_current_device()
    torch.manual_seed(0)
    results = {}
    for arch, path in model_paths.items():
        model = build_model(AutoConfig.from_pretrained(path), "cpu")
        results[arch] = _megatron_results(model, path, input_ids, world_size)
    if rank == 0:
        torch.save(results, out_path)
    ps.destroy_model_parallel()
    dist.destroy_process_group()



def _megatron(model_paths: dict, ep: int, out_dir) -> dict:
    out = out_dir / f"megatron_ep{ep}.pt"
    mp.start_processes(_worker, args=(ep, model_paths, pick_port(), _input_ids(), str(out)), nprocs=ep,
                       join=True, start_method="spawn")
    return torch.load(out)


@pytest.fixture(scope="module")
def megatron_ep1(moe_models, tmp_path_factory) -> dict:
    """Every architecture's Megatron results at EP=1, from one spawned process."""
    return _megatron(moe_models, 1, tmp_path_factory.mktemp("ep1"))


@pytest.fixture(scope="module")
def megatron_ep2(moe_models, tmp_path_factory) -> dict:
    """DeepSeek-V3's and Qwen3-MoE's Megatron results at EP=2, from one pair of spawned processes."""
    paths = {arch: moe_models[arch] for arch in EP2_ARCHITECTURES}
    return _megatron(paths, 2, tmp_path_factory.mktemp("ep2"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_full_round_trip_is_bitwise(moe_models, arch):
    from rl.trainer.models.moe import full_to_hf, hf_to_full

    path = moe_models[arch]
    hf_config = AutoConfig.from_pretrained(path)
    hf_state = load_file(f"{path}/model.safetensors")
    back = full_to_hf(hf_to_full(hf_state, hf_config), hf_config)
    assert back.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_fused_expert_layout_converts_like_the_checkpoint(moe_models):
    """transformers' in-memory state (experts fused into [E, 2I, H]) gives the same full state."""
    from rl.trainer.models.moe import hf_to_full

    path = moe_models["deepseek_v3"]
    hf_config = AutoConfig.from_pretrained(path)
    from_checkpoint = hf_to_full(load_file(f"{path}/model.safetensors"), hf_config)
    in_memory = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in in_memory)
    from_memory = hf_to_full(in_memory, hf_config)
    assert from_memory.keys() == from_checkpoint.keys()
    assert all(torch.equal(from_memory[k], from_checkpoint[k]) for k in from_checkpoint)


def test_unknown_hf_tensor_is_an_error(moe_models):
    from rl.trainer.models.moe import hf_to_full

    path = moe_models["qwen3_moe"]
    hf_state = load_file(f"{path}/model.safetensors")
    hf_state["model.layers.0.mlp.shared_expert_gate.weight"] = torch.zeros(1, 64)
    with pytest.raises(KeyError, match="shared_expert_gate"):
        hf_to_full(hf_state, AutoConfig.from_pretrained(path))


@pytest.mark.multiproc
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_megatron_logits_equal_hf(moe_models, megatron_ep1, arch):
    expected = _hf_logits(moe_models[arch], _input_ids())
    got = megatron_ep1[arch]
    assert got["logits"].shape == expected.shape
    assert (got["logits"] - expected).abs().max().item() <= TOLERANCE
    assert (got["perturbed"] - expected).abs().max().item() > TOLERANCE
    assert got["grads_finite"] and got["some_expert_grad_nonzero"]
    assert got["grads_missing"] == []
    assert got["not_allreduced"] == []  # without expert parallelism every gradient is data-parallel


@pytest.mark.multiproc
@pytest.mark.parametrize("arch", EP2_ARCHITECTURES)
def test_expert_parallel_logits_equal_hf(moe_models, megatron_ep2, arch):
    expected = _hf_logits(moe_models[arch], _input_ids())
    got = megatron_ep2[arch]
    assert (got["logits"] - expected).abs().max().item() <= TOLERANCE
    # Megatron marks routed-expert weights (only those) as not data-parallel-reduced under EP
    assert got["not_allreduced"]
    assert all(".mlp.experts.local_experts." in name for name in got["not_allreduced"])
