"""Supervised warm start of the demo model, so RL starts from a weak but non-zero policy.

The random tiny Qwen2 is trained with HF transformers on "a+b=c<eos>" (loss on the answer tokens
only) until its *sampled* accuracy (temperature 1) reaches `target_accuracy`. The result is cached
under `model.cache_dir`, keyed by everything that determines it, so runs and tests reuse it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from rewards import exact_match
from rl.config import ModelConfig, TaskConfig, WarmStartConfig
from rl.tasks import AdditionTask, Problem
from rl.tiny_model import create_tiny_qwen2, save_hf

log = logging.getLogger(__name__)
_RECIPE_VERSION = 1  # bump when this recipe changes, to invalidate cached models
# Warm-start problems come from a stream disjoint from the RL stream (different seed offset).
_WARM_START_SEED_OFFSET = 7919


def demo_model_path(model: ModelConfig, warm: WarmStartConfig, task: TaskConfig) -> str:
    """Build (or reuse from cache) the warm-started demo model and return its directory."""
    key = json.dumps([_RECIPE_VERSION, dataclasses.asdict(model), dataclasses.asdict(warm),
                      dataclasses.asdict(task)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = os.path.abspath(os.path.join(model.cache_dir, f"tiny-qwen2-{task.name}-{digest}"))
    if os.path.isfile(os.path.join(path, "warm_start.json")):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    create_tiny_qwen2(tmp, model.hidden_size, model.num_layers, model.num_attention_heads,
                      model.num_key_value_heads, model.intermediate_size, seed=task.seed)
    report = warm_start(tmp, warm, AdditionTask(task.digits, task.seed + _WARM_START_SEED_OFFSET))
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _sft_batch(problems: list[Problem], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 outside the answer and its end-of-sequence token)."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer.encode(p.prompt)
        answer = tokenizer.encode(p.reference) + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[Problem], max_new_tokens: int = 8) -> float:
    """Fraction of problems answered exactly when sampling at temperature 1 (HF generate)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(exact_match(t, p.reference) for t, p in zip(texts, problems)) / len(problems)


def warm_start(path: str, cfg: WarmStartConfig, task: AdditionTask) -> dict:
    """Train the model at `path` in place until sampled accuracy >= cfg.target_accuracy."""
    torch.manual_seed(task.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    eval_problems = task.batch(10_000_000, cfg.eval_prompts)
    accuracy, step = 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids, labels = _sft_batch(task.batch(step * cfg.batch_size, cfg.batch_size), tokenizer)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0:
            model.eval()
            accuracy = sampled_accuracy(model, tokenizer, eval_problems)
            log.info("warm start step %d: loss %.3f, sampled accuracy %.3f", step, loss.item(), accuracy)
            if accuracy >= cfg.target_accuracy:
                break
    save_hf(model, tokenizer, path)
    return {"steps": step, "sampled_accuracy": accuracy, "target_accuracy": cfg.target_accuracy}
