"""Supervised warm start of the demo model, so RL starts from a weak but non-zero policy.

The random tiny Qwen2 (or tiny MoE: `model.architecture`) is trained with HF transformers on "a+b=c<eos>" (loss on the answer tokens
only) with label smoothing, for a fixed number of steps with a cosine learning-rate decay. Label
smoothing leaves probability spread over wrong tokens, so the converged policy ranks the right
answer first (greedy accuracy near 1) but the policy RL samples from (temperature 1) is mostly
wrong. RL must then concentrate the distribution, which is what its rollouts reward. The model is cached under
`model.cache_dir`, keyed by everything that determines it, so runs and tests reuse it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.builtin.verifiable import exact_match
from rl.data.config import TaskConfig
from rl.data.tasks import AdditionTask
from rl.demo.config import ModelConfig, WarmStartConfig
from rl.demo.tiny_model import MOE_BUILDERS, TOKENIZERS, create_tiny_qwen2, save_hf
from rl.sample import Problem

log = logging.getLogger(__name__)
_RECIPE_VERSION = 3  # bump when this recipe changes, to invalidate cached models
# Warm-start problems come from a stream disjoint from the RL stream (different seed offset).
_WARM_START_SEED_OFFSET = 7919
_EVAL_START = 10_000_000  # evaluation problems: a range of the stream training never reaches


def demo_model_path(model: ModelConfig, warm: WarmStartConfig, task: TaskConfig) -> str:
    """Build (or reuse from cache) the warm-started demo model and return its directory."""
    key = json.dumps([_RECIPE_VERSION, dataclasses.asdict(model), dataclasses.asdict(warm),
                      dataclasses.asdict(task)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = os.path.abspath(os.path.join(model.cache_dir, f"tiny-{model.architecture}-{task.name}-{digest}"))
    if os.path.isfile(os.path.join(path, "warm_start.json")):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if model.architecture == "qwen2":
        create_tiny_qwen2(tmp, model.hidden_size, model.num_layers, model.num_attention_heads,
                          model.num_key_value_heads, model.intermediate_size, seed=task.seed,
                          characters=TOKENIZERS[model.tokenizer], max_position_embeddings=model.max_position_embeddings)
    else:  # the tiny MoE builders' shapes
        MOE_BUILDERS[model.architecture](tmp, seed=task.seed, characters=TOKENIZERS[model.tokenizer],
                                         max_position_embeddings=model.max_position_embeddings)
    stream = AdditionTask(task.digits, task.seed + _WARM_START_SEED_OFFSET, task.reverse_answer)
    report = warm_start(tmp, warm, stream)
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
def accuracy(model, tokenizer, problems: list[Problem], sample: bool, max_new_tokens: int = 8) -> float:
    """Exact-match accuracy of HF `generate`: sampled at temperature 1, or greedy."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = model.generate(**enc, **options, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(exact_match(t, p.reference) for t, p in zip(texts, problems)) / len(problems)


def warm_start(path: str, cfg: WarmStartConfig, task: AdditionTask) -> dict:
    """Train the model at `path` in place; report its greedy and sampled accuracy on held-out problems."""
    torch.manual_seed(task.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, cfg.steps))
    for step in range(1, cfg.steps + 1):
        model.train()
        ids, labels = _sft_batch(task.batch(step * cfg.batch_size, cfg.batch_size), tokenizer)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=cfg.label_smoothing)
        loss.backward()
        optim.step()
        schedule.step()
        optim.zero_grad(set_to_none=True)
        if step % 200 == 0:
            log.info("warm start step %d/%d: loss %.3f", step, cfg.steps, loss.item())
    model.eval()
    eval_problems = task.batch(_EVAL_START, cfg.eval_prompts)
    report = {"steps": cfg.steps, "label_smoothing": cfg.label_smoothing,
              "greedy_accuracy": accuracy(model, tokenizer, eval_problems, sample=False),
              "sampled_accuracy": accuracy(model, tokenizer, eval_problems, sample=True)}
    log.info("warm start done: %s", report)
    save_hf(model, tokenizer, path)
    return report
