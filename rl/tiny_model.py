"""The project's own tiny Qwen2 model: a character-level tokenizer and random weights, in HF format.

Nothing is downloaded: the tokenizer is built with `tokenizers` from a fixed character set, and the
weights are a seeded random init of `transformers.Qwen2ForCausalLM`.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS = "<pad>", "<eos>"
# 2 special tokens + 62 characters = 64 ids, so the vocabulary splits evenly for tensor parallelism.
CHARACTERS = "0123456789+-*=?:,. " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQ"
VOCAB_SIZE = 2 + len(CHARACTERS)
assert VOCAB_SIZE == 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def create_tiny_qwen2(
    path: str,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> str:
    """Write a randomly initialised tiny Qwen2 (fp32 safetensors + tokenizer) to `path`."""
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=256,
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
