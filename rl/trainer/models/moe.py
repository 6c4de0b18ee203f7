"""Mixture-of-experts architectures between HuggingFace and the full Megatron-core GPT state dict.

Covered: Qwen3-MoE (GQA with q/k norms, routed experts) and DeepSeek-V3 (multi-latent attention,
`first_k_dense_replace` dense layers, routed + shared experts, sigmoid routing with a score-correction
bias, optional group-limited routing), which is also Kimi K2's architecture (`model_type` "kimi_k2").

"Full" means the names and shapes `GPTModel.state_dict()` has at TP = PP = EP = 1: global layer and
expert numbers, nothing sharded, gated `linear_fc1` as [gate; up]. Splitting it per rank is a separate,
architecture-independent step. The HF side is the checkpoint layout (`mlp.experts.{e}.gate_proj.weight`
...), which is what `save_pretrained` writes and what inference engines load; `hf_to_full` also accepts
transformers' in-memory fused layout (`mlp.experts.gate_up_proj` [E, 2I, H]).

Name mapping, per layer (Megatron `decoder.layers.{i}.` <-> HF `model.layers.{i}.`):
  input_layernorm.weight                          input_layernorm.weight
  pre_mlp_layernorm.weight                        post_attention_layernorm.weight
  self_attention.linear_proj.weight               self_attn.o_proj.weight
  Qwen3-MoE attention:
  self_attention.linear_qkv.weight                self_attn.{q,k,v}_proj.weight (rows per KV group: q|k|v)
  self_attention.q_layernorm.weight               self_attn.q_norm.weight
  self_attention.k_layernorm.weight               self_attn.k_norm.weight
  DeepSeek-V3 attention (MLA):
  self_attention.linear_q_down_proj.weight        self_attn.q_a_proj.weight
  self_attention.q_layernorm.weight               self_attn.q_a_layernorm.weight
  self_attention.linear_q_up_proj.weight          self_attn.q_b_proj.weight       (*)
  self_attention.linear_q_proj.weight             self_attn.q_proj.weight         (*, q_lora_rank None)
  self_attention.linear_kv_down_proj.weight       self_attn.kv_a_proj_with_mqa.weight (*)
  self_attention.kv_layernorm.weight              self_attn.kv_a_layernorm.weight
  self_attention.linear_kv_up_proj.weight         self_attn.kv_b_proj.weight
  (*) identical when HF `rope_interleave` is True (DeepSeek's default; Megatron's MLA always reads
      the rotary dims as interleaved pairs); otherwise the rotary rows are permuted.
  dense MLP:
  mlp.linear_fc1.weight                           [mlp.gate_proj.weight; mlp.up_proj.weight]
  mlp.linear_fc2.weight                           mlp.down_proj.weight
  MoE:
  mlp.router.weight                               mlp.gate.weight
  mlp.router.expert_bias                          mlp.gate.e_score_correction_bias (DeepSeek)
  mlp.experts.local_experts.{e}.linear_fc1.weight [mlp.experts.{e}.gate_proj.weight; ...up_proj.weight]
  mlp.experts.local_experts.{e}.linear_fc2.weight mlp.experts.{e}.down_proj.weight
  mlp.shared_experts.linear_fc1.weight            [mlp.shared_experts.gate_proj.weight; ...up_proj.weight]
  mlp.shared_experts.linear_fc2.weight            mlp.shared_experts.down_proj.weight
plus embedding.word_embeddings.weight <-> model.embed_tokens.weight, decoder.final_layernorm.weight
<-> model.norm.weight and output_layer.weight <-> lm_head.weight (absent when embeddings are tied).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rl.trainer.models.dense import apply_rules

DEEPSEEK_TYPES = ("deepseek_v3", "kimi_k2")
QWEN3_MOE_TYPES = ("qwen3_moe",)
SUPPORTED_MODEL_TYPES = DEEPSEEK_TYPES + QWEN3_MOE_TYPES


# --- architecture facts read from the HF config ----------------------------------------------------
def _check_supported(hf) -> None:
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"hf_megatron_moe: unsupported model_type {hf.model_type!r} "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {hf.hidden_act!r}: only SwiGLU (silu) is mapped")


def is_mla(hf) -> bool:
    """Whether the architecture uses multi-latent attention (DeepSeek-V3 / Kimi K2)."""
    return hf.model_type in DEEPSEEK_TYPES


def num_experts(hf) -> int:
    return hf.n_routed_experts if is_mla(hf) else hf.num_experts


def moe_layer_pattern(hf) -> list[int]:
    """Per layer: 1 for a MoE layer, 0 for a dense one (Megatron's `moe_layer_freq` as a list)."""
    layers = range(hf.num_hidden_layers)
    if is_mla(hf):
        freq = getattr(hf, "moe_layer_freq", 1) or 1
        return [int(i >= hf.first_k_dense_replace and i % freq == 0) for i in layers]
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = hf.decoder_sparse_step
    return [int(i not in dense and hf.num_experts > 0 and (i + 1) % step == 0) for i in layers]


def _rope_parameters(hf) -> dict:
    params = getattr(hf, "rope_parameters", None)
    if params:
        return dict(params)
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    legacy.setdefault("rope_type", legacy.get("type", "default"))
    legacy.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return legacy


def rope_theta(hf) -> float:
    return float(_rope_parameters(hf)["rope_theta"])


def _mla_rope_kwargs(hf) -> dict:
    """MLA rotary settings matching HF's: plain RoPE, or YaRN as DeepSeek-V3 / Kimi K2 configure it."""
    rp = _rope_parameters(hf)
    kind = rp.get("rope_type", "default")
    if kind == "default":
        # rotary_scaling_factor 1 makes Megatron's softmax-scale mscale exactly 1.
        return dict(rope_type="rope", rotary_base=rope_theta(hf), rotary_scaling_factor=1.0,
                    mscale=1.0, mscale_all_dim=0.0)
    if kind != "yarn":
        raise NotImplementedError(f"MLA rope_type {kind!r}: only default and yarn are mapped")
    if rp.get("attention_factor") is not None or rp.get("truncate", True) is False:
        raise NotImplementedError("yarn with an explicit attention_factor or truncate=False is not mapped")
    factor = rp.get("factor") or hf.max_position_embeddings / rp["original_max_position_embeddings"]
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        pair = (float(mscale), float(mscale_all_dim))
    elif not mscale_all_dim:
        pair = (1.0, 0.0)  # HF: attention factor from `factor` alone, softmax scale unchanged
    else:
        raise NotImplementedError("yarn with mscale_all_dim but no mscale is not mapped")
    return dict(rope_type="yarn", rotary_base=rope_theta(hf), rotary_scaling_factor=float(factor),
                original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
                beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                mscale=pair[0], mscale_all_dim=pair[1])


def _router_kwargs(hf) -> dict:
    """Routing identical to HF's in the forward pass: no aux loss, no jitter, frozen expert bias."""
    topk = hf.num_experts_per_tok
    kwargs = dict(
        num_moe_experts=num_experts(hf), moe_router_topk=topk, moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_layer_freq=moe_layer_pattern(hf), moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_grouped_gemm=False, moe_permute_fusion=False, moe_shared_expert_overlap=False,
    )
    if is_mla(hf):
        scoring, method = getattr(hf, "scoring_func", "sigmoid"), getattr(hf, "topk_method", "noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise NotImplementedError(f"DeepSeek routing {scoring!r}/{method!r}: only sigmoid/noaux_tc is mapped")
        if topk > 1 and not hf.norm_topk_prob:
            raise NotImplementedError("sigmoid routing without norm_topk_prob: Megatron always normalises top-k")
        kwargs.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_bias_update_rate=0.0,  # HF treats the bias as a fixed buffer
                      moe_router_topk_scaling_factor=float(hf.routed_scaling_factor))
        if hf.n_shared_experts:
            kwargs["moe_shared_expert_intermediate_size"] = hf.moe_intermediate_size * hf.n_shared_experts
        groups, group_topk = hf.n_group or 1, hf.topk_group or 1
        if groups > 1:
            # HF scores a group by the sum of its top-2 experts; Megatron by its top (topk // group_topk).
            if topk // group_topk != 2:
                raise NotImplementedError(
                    f"group-limited routing with top_k={topk}, topk_group={group_topk}: Megatron would score "
                    "groups by their top-(top_k // topk_group) experts, HF by their top-2")
            kwargs.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    else:
        # softmax -> top-k -> renormalise equals top-k on logits -> softmax (Megatron's non-pre-softmax).
        kwargs.update(moe_router_score_function="softmax", moe_router_pre_softmax=not hf.norm_topk_prob)
    return kwargs


def megatron_arch_kwargs(hf) -> dict:
    """The `TransformerConfig` (or `MLATransformerConfig`) fields that describe the architecture.

    Parallel sizes, dtypes, fusions and initialisation are the engine's to add.
    """
    _check_supported(hf)
    kwargs = dict(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                  num_attention_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
                  normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
                  activation_func=F.silu, add_bias_linear=False, qk_layernorm=True)
    if getattr(hf, "attention_bias", False):
        raise NotImplementedError("attention_bias=True is not mapped (Megatron would add biases elsewhere too)")
    if is_mla(hf):
        kwargs.update(multi_latent_attention=True, q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
                      qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim,
                      v_head_dim=hf.v_head_dim, **_mla_rope_kwargs(hf))
    else:
        rp = _rope_parameters(hf)
        if rp.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rp['rope_type']!r} is not mapped for Qwen3-MoE")
        kwargs.update(num_query_groups=hf.num_key_value_heads, kv_channels=_head_dim(hf), add_qkv_bias=False)
    kwargs.update(_router_kwargs(hf))
    return kwargs


def transformer_config_class(hf):
    """`MLATransformerConfig` for MLA architectures, else `TransformerConfig`."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig if is_mla(hf) else TransformerConfig


def gpt_model_kwargs(hf) -> dict:
    """`GPTModel` arguments besides config and spec (pre/post_process under PP are the engine's)."""
    return dict(vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
                share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
                position_embedding_type="rope", rotary_base=int(rope_theta(hf)), parallel_output=True)


def layer_spec(hf, device: str, config=None):
    """The decoder block spec: dense and MoE layers as `moe_layer_freq` says, local (non-TE) modules.

    `config` is the `TransformerConfig` the model is built with: under pipeline parallelism the block
    spec holds only this stage's layers, which Megatron reads from it (and from parallel_state).
    Without one, a config from `megatron_arch_kwargs` alone is used (no pipeline parallelism).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from rl.trainer import megatron_cpu

    if config is None:
        config = transformer_config_class(hf)(**megatron_arch_kwargs(hf), use_cpu_initialization=True)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    if device == "cpu":
        return megatron_cpu.cpu_block_spec(spec)
    if is_mla(hf):
        # Megatron's local DotProductAttention cannot take MLA's separate key/value head sizes, on any
        # device; the SDPA core attention has no CPU-only code in it.
        from megatron.core.transformer.multi_latent_attention import MLASelfAttention

        megatron_cpu.fix_mla_te_flag()
        for layer in spec.layer_specs:
            if layer.submodules.self_attention.module is MLASelfAttention:
                layer.submodules.self_attention.submodules.core_attention = megatron_cpu.SDPACoreAttention
    return spec


def build_model(hf, device: str = "cpu", **config_overrides):
    """A `GPTModel` for this architecture with parallel sizes read from `parallel_state` (for tests:
    the training engine builds its own). Weights are random: load a state dict next."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from rl.trainer import megatron_cpu

    if device == "cpu":
        megatron_cpu.use_cpu_rng_tracker()  # the embedding forks it under sequence parallelism
    tp = ps.get_tensor_model_parallel_world_size()
    kwargs = megatron_arch_kwargs(hf)
    kwargs.update(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=tp > 1,  # Megatron's MoE layer refuses to train under TP without it
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=device == "cpu",
        # initialisation is what marks TP-split parameters (`tensor_model_parallel`, `partition_dim`)
        perform_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False)
    kwargs.update(config_overrides)
    config = transformer_config_class(hf)(**kwargs)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(hf, device, config), **gpt_model_kwargs(hf))
    return model.to(device)


# --- HF <-> full Megatron state dict ---------------------------------------------------------------
def _head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
                    head_dim: int) -> torch.Tensor:
    """Megatron's fused QKV rows: for each key/value group, its query heads, then its key, then its value."""
    q = q.reshape(groups, heads // groups * head_dim, -1)
    k, v = (t.reshape(groups, head_dim, -1) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, -1)
    q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, qkv.shape[-1]) for t in (q, k, v))


def _rope_row_order(hf) -> Optional[torch.Tensor]:
    """Row order taking HF's rotary rows to Megatron's, or None when they already agree.

    Megatron's MLA reads the rotary dims as pairs (x0, x1), (x2, x3) ... and rotates the first of each
    pair against the second, which is HF's `rope_interleave=True`. For HF's half-split layout, Megatron
    row 2j must be HF row j and row 2j+1 HF row j + d/2.
    """
    if getattr(hf, "rope_interleave", True):
        return None
    half = hf.qk_rope_head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _reorder_rope_rows(weight: torch.Tensor, head_rows: int, rope_dim: int, order: Optional[torch.Tensor],
                       inverse: bool = False) -> torch.Tensor:
    """Permute the last `rope_dim` rows of every block of `head_rows` rows (one block per head)."""
    if order is None:
        return weight
    if inverse:
        order = torch.argsort(order)
    blocks = weight.reshape(-1, head_rows, weight.shape[-1])
    rest, rope = blocks.split([head_rows - rope_dim, rope_dim], dim=1)
    return torch.cat([rest, rope[:, order]], dim=1).reshape(weight.shape)


def _mla_q_projection(hf) -> tuple[int, str, str]:
    """MLA's query projection: rows per head, its Megatron module name and its HF module name."""
    rows = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    if hf.q_lora_rank is not None:
        return rows, "linear_q_up_proj", "q_b_proj"
    return rows, "linear_q_proj", "q_proj"


_COMMON = {  # Megatron layer suffix -> HF layer suffix, copied as they are
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
}
_MLA_DIRECT = {
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
}
_QWEN3_DIRECT = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def _layer_tables(hf, layer: int) -> dict[str, str]:
    """Megatron suffix -> HF suffix for this layer's tensors that map one-to-one."""
    table = dict(_COMMON)
    if is_mla(hf):
        table.update(_MLA_DIRECT)
        if hf.q_lora_rank is None:
            del table["self_attention.linear_q_down_proj.weight"], table["self_attention.q_layernorm.weight"]
    else:
        table.update(_QWEN3_DIRECT)
    if moe_layer_pattern(hf)[layer]:
        table["mlp.router.weight"] = "mlp.gate.weight"
        if is_mla(hf):
            table["mlp.router.expert_bias"] = "mlp.gate.e_score_correction_bias"
    return table


def _mlps(hf, layer: int) -> list[tuple[str, str]]:
    """(Megatron prefix, HF prefix) of every gated MLP in this layer."""
    if not moe_layer_pattern(hf)[layer]:
        return [("mlp.", "mlp.")]
    pairs = [(f"mlp.experts.local_experts.{e}.", f"mlp.experts.{e}.") for e in range(num_experts(hf))]
    if is_mla(hf) and hf.n_shared_experts:
        pairs.append(("mlp.shared_experts.", "mlp.shared_experts."))
    return pairs


def _unfuse_experts(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory fused expert tensors -> the per-expert checkpoint names."""
    out = {}
    for name, tensor in hf_state.items():
        match = re.fullmatch(r"(.*\.mlp\.experts\.)(gate_up_proj|down_proj)", name)
        if match is None:
            out[name] = tensor
            continue
        for e in range(tensor.shape[0]):
            if match.group(2) == "down_proj":
                out[f"{match.group(1)}{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{match.group(1)}{e}.gate_proj.weight"], out[f"{match.group(1)}{e}.up_proj.weight"] = gate, up
    return out


def _ignored_hf_key(name: str, hf) -> bool:
    """Keys HF itself ignores: multi-token-prediction layers past the last decoder layer, rotary caches."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return (match is not None and int(match.group(1)) >= hf.num_hidden_layers) or name.endswith("rotary_emb.inv_freq")


def hf_to_full(hf_state: dict[str, torch.Tensor], hf) -> dict[str, torch.Tensor]:
    """The full Megatron state dict from an HF state dict (checkpoint or fused-expert layout).

    Every HF tensor must be used (apart from MTP layers and rotary caches): a name this mapping does
    not know is an error, not a silent drop.
    """
    _check_supported(hf)
    hf_state = _unfuse_experts(hf_state)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return hf_state[name]

    tied = bool(getattr(hf, "tie_word_embeddings", False))
    full = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
            "decoder.final_layernorm.weight": take("model.norm.weight")}
    if not tied:
        full["output_layer.weight"] = take("lm_head.weight")
    order = _rope_row_order(hf) if is_mla(hf) else None
    for i in range(hf.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in _layer_tables(hf, i).items():
            full[m + msuffix] = take(h + hsuffix)
        attn = h + "self_attn."
        if is_mla(hf):
            q_rows, q_name, q_hf = _mla_q_projection(hf)
            full[m + f"self_attention.{q_name}.weight"] = _reorder_rope_rows(
                take(attn + f"{q_hf}.weight"), q_rows, hf.qk_rope_head_dim, order)
            kv_a = take(attn + "kv_a_proj_with_mqa.weight")
            full[m + "self_attention.linear_kv_down_proj.weight"] = _reorder_rope_rows(
                kv_a, kv_a.shape[0], hf.qk_rope_head_dim, order)
        else:
            full[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(
                take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"),
                hf.num_attention_heads, hf.num_key_value_heads, _head_dim(hf))
        for mprefix, hprefix in _mlps(hf, i):
            full[m + mprefix + "linear_fc1.weight"] = torch.cat(
                [take(h + hprefix + "gate_proj.weight"), take(h + hprefix + "up_proj.weight")], dim=0)
            full[m + mprefix + "linear_fc2.weight"] = take(h + hprefix + "down_proj.weight")
    unused = sorted(k for k in hf_state if k not in used and not _ignored_hf_key(k, hf))
    if unused:
        raise KeyError(f"HF tensors with no Megatron counterpart: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return full


def full_to_hf_rules(hf) -> dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """Megatron full-state name -> the function giving its HF tensors (one source tensor each, so any
    subset of the full state converts on its own), in the per-expert checkpoint layout."""
    _check_supported(hf)
    rules: dict[str, Callable] = {"embedding.word_embeddings.weight": lambda t: {"model.embed_tokens.weight": t},
                                  "decoder.final_layernorm.weight": lambda t: {"model.norm.weight": t}}
    if not getattr(hf, "tie_word_embeddings", False):
        rules["output_layer.weight"] = lambda t: {"lm_head.weight": t}
    order = _rope_row_order(hf) if is_mla(hf) else None
    for i in range(hf.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuffix, hsuffix in _layer_tables(hf, i).items():
            rules[m + msuffix] = lambda t, name=h + hsuffix: {name: t}
        attn = h + "self_attn."
        if is_mla(hf):
            q_rows, q_name, q_hf = _mla_q_projection(hf)
            rules[m + f"self_attention.{q_name}.weight"] = lambda t, name=attn + f"{q_hf}.weight": {
                name: _reorder_rope_rows(t, q_rows, hf.qk_rope_head_dim, order, inverse=True)}
            rules[m + "self_attention.linear_kv_down_proj.weight"] = lambda t, name=attn + "kv_a_proj_with_mqa.weight": {
                name: _reorder_rope_rows(t, t.shape[0], hf.qk_rope_head_dim, order, inverse=True)}
        else:
            names = [attn + f"{p}_proj.weight" for p in "qkv"]
            rules[m + "self_attention.linear_qkv.weight"] = lambda t, names=names: dict(zip(names, _split_qkv(
                t, hf.num_attention_heads, hf.num_key_value_heads, _head_dim(hf))))
        for mprefix, hprefix in _mlps(hf, i):
            p = h + hprefix
            rules[m + mprefix + "linear_fc1.weight"] = lambda t, names=(p + "gate_proj.weight", p + "up_proj.weight"): (
                dict(zip(names, t.chunk(2, dim=0))))
            rules[m + mprefix + "linear_fc2.weight"] = lambda t, name=p + "down_proj.weight": {name: t}
    return rules


def full_to_hf(full: dict[str, torch.Tensor], hf, partial: bool = False) -> dict[str, torch.Tensor]:
    """An HF state dict from the full Megatron state dict (or from any subset of it, with `partial`)."""
    return apply_rules(full_to_hf_rules(hf), full, partial)
