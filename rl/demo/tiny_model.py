"""The project's own tiny Qwen2 model: a character-level tokenizer and random weights, in HF format.

Nothing is downloaded: the tokenizer is built with `tokenizers` from a fixed character set, and the
weights are a seeded random init of `transformers.Qwen2ForCausalLM`.
"""
from __future__ import annotations

import os
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS = "<pad>", "<eos>"
# 2 special tokens + 62 characters = 64 ids, so the vocabulary splits evenly for tensor parallelism.
CHARACTERS = "0123456789+-*=?:,. " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQ"
VOCAB_SIZE = 2 + len(CHARACTERS)
assert VOCAB_SIZE == 64
# what agentic tasks need besides: JSON tool calls, <tool_call> markup, newlines
PRINTABLE = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
TOKENIZERS = {"demo": CHARACTERS, "printable": PRINTABLE}


def build_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """One id per character. The vocabulary holds each character's byte-level form (space is "Ġ",
    newline "Ċ"), because transformers loads a saved Qwen2 model's tokenizer as a byte-level
    `Qwen2Tokenizer`: with these entries it encodes and decodes spaces and newlines exactly as this one
    does. Unknown characters become <pad> (an id the model has; a separate unk would not be)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {PAD: 0, EOS: 1}
    for ch in characters:
        vocab[byte_level.pre_tokenize_str(ch)[0][0]] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=PAD)


def create_tiny_qwen2(
    path: str,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    characters: str = CHARACTERS,
    max_position_embeddings: int = 256,
) -> str:
    """Write a randomly initialised tiny Qwen2 (fp32 safetensors + tokenizer) to `path`."""
    tokenizer = build_tokenizer(characters)
    config = Qwen2Config(
        vocab_size=2 + len(characters),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    save_hf(model, tokenizer, path)
    return path


def save_hf(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _spread_routers(model: torch.nn.Module, router_std: float, bias_std: float) -> None:
    """Give every MoE router weights large enough, and a score-correction bias (if any) non-zero, so
    that tokens go to different experts and a wrong routing detail changes the output. HF's init leaves
    routers at std 0.02 (near-uniform scores) and the bias at exactly zero."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(module, "weight"):
                module.weight.normal_(0.0, router_std)
                bias = getattr(module, "e_score_correction_bias", None)
                if bias is not None:
                    bias.normal_(0.0, bias_std)


# YaRN as DeepSeek-V3 and Kimi K2 configure it (mscale == mscale_all_dim), scaled to the tiny context.
# SGLang's CPU path serves MLA only with this rotary kind ("deepseek_yarn"), so it is the tiny model's default.
TINY_DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def create_tiny_deepseek_v3(
    path: str,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 3,
    first_k_dense_replace: int = 1,
    num_attention_heads: int = 4,
    intermediate_size: int = 96,
    moe_intermediate_size: int = 32,
    n_routed_experts: int = 8,
    num_experts_per_tok: int = 2,
    n_shared_experts: int = 1,
    n_group: int = 2,
    topk_group: int = 1,
    routed_scaling_factor: float = 2.5,
    q_lora_rank: int | None = 32,
    kv_lora_rank: int = 16,
    qk_nope_head_dim: int = 16,
    qk_rope_head_dim: int = 8,
    v_head_dim: int = 16,
    rope_interleave: bool = True,
    rope_parameters: dict | None = None,
    tie_word_embeddings: bool = False,
    characters: str = CHARACTERS,
    max_position_embeddings: int = 256,
) -> str:
    """Write a randomly initialised tiny DeepSeek-V3 (Kimi K2's architecture: MLA, dense first layers,
    routed + shared experts, sigmoid group-limited routing with a correction bias) to `path`; one token
    per character of `characters` (both MoE builders)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tokenizer = build_tokenizer(characters)
    config = DeepseekV3Config(
        vocab_size=2 + len(characters), hidden_size=hidden_size, num_hidden_layers=num_layers,
        first_k_dense_replace=first_k_dense_replace, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size, n_routed_experts=n_routed_experts,
        num_experts_per_tok=num_experts_per_tok, n_shared_experts=n_shared_experts, n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor, norm_topk_prob=True,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_interleave=rope_interleave,
        rope_parameters=rope_parameters or dict(TINY_DEEPSEEK_YARN),
        moe_layer_freq=1, topk_method="noaux_tc", scoring_func="sigmoid",  # DeepSeek-V3's keys that SGLang reads
        num_mtp_layers=0, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).to(torch.float32)
    _spread_routers(model, router_std=0.1, bias_std=0.05)
    save_hf(model, tokenizer, path)
    return path


def create_tiny_qwen3(path: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 96,
                      tie_word_embeddings: bool = False) -> str:
    """Write a randomly initialised tiny dense Qwen3 (GQA with per-head q/k RMSNorm, no qkv bias) to `path`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=32,
        intermediate_size=intermediate_size, use_sliding_window=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # norms away from 1, so a dropped or misplaced q/k norm changes the logits
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    save_hf(model, tokenizer, path)
    return path


def create_tiny_qwen3_moe(
    path: str,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 96,
    moe_intermediate_size: int = 32,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    norm_topk_prob: bool = True,
    mlp_only_layers: list[int] | None = None,
    tie_word_embeddings: bool = False,
    characters: str = CHARACTERS,
    max_position_embeddings: int = 256,
) -> str:
    """Write a randomly initialised tiny Qwen3-MoE (GQA with q/k norms, routed experts, softmax top-k
    routing) to `path`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer(characters)
    config = Qwen3MoeConfig(
        vocab_size=2 + len(characters), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=mlp_only_layers or [], use_sliding_window=False,
        sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    _spread_routers(model, router_std=0.1, bias_std=0.0)
    save_hf(model, tokenizer, path)
    return path


MOE_BUILDERS = {"qwen3_moe": create_tiny_qwen3_moe, "deepseek_v3": create_tiny_deepseek_v3}


def tiny_moe_shape(architecture: str) -> dict:
    """The shape a parallel layout is checked against (rl/trainer/parallel_layout.py) of the tiny MoE
    `architecture` as its builder makes it by default."""
    from inspect import signature

    p = {name: param.default for name, param in signature(MOE_BUILDERS[architecture]).parameters.items()}
    return dict(num_layers=p["num_layers"], num_heads=p["num_attention_heads"],
                num_kv_heads=p.get("num_key_value_heads", p["num_attention_heads"]),
                num_experts=p.get("num_experts") or p["n_routed_experts"], latent_attention="kv_lora_rank" in p)
