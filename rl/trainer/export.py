"""HF export: the `save_pretrained` layout (config.json, safetensors, tokenizer files,
generation_config.json) from full HF-named tensors, e.g. `TrainingEngine.hf_state_dict()`, so
transformers and SGLang load a trained policy directly."""
from __future__ import annotations

import json
import os
import shutil

import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")


def export_hf(out_dir: str, hf_state_dict: dict[str, torch.Tensor], source_model_path: str,
              max_shard_bytes: int = 5 * 2**30) -> str:
    """Write `hf_state_dict` as a HuggingFace model directory next to the source model's config and
    tokenizer, in the layout `save_pretrained` produces (one `model.safetensors`, or indexed shards
    when larger than `max_shard_bytes`). Tied output weights are dropped as `save_pretrained` does.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    os.makedirs(out_dir, exist_ok=True)
    config = AutoConfig.from_pretrained(source_model_path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state_dict.items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = dtypes.pop()
    config.save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        src = os.path.join(source_model_path, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return out_dir
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir
