"""Supervised warm start of the demo model, so RL starts from a weak but non-zero policy.

Two recipes, both fine-tuning the random tiny Qwen2 (or tiny MoE: `model.architecture`) with HF
transformers for a fixed number of steps with a cosine learning-rate decay:

- the addition task: "a+b=c<eos>" (loss on the answer tokens only) with label smoothing. Label
  smoothing leaves probability spread over wrong tokens, so the converged policy ranks the right
  answer first (greedy accuracy near 1) but the policy RL samples from (temperature 1) is mostly
  wrong. RL must then concentrate the distribution, which is what its rollouts reward;
- the PARL swarm on wide search: demonstrated episodes of both roles (rl/demo/swarm_demos.py), mostly
  serial, so RL has parallelism to find.

The model is cached under `model.cache_dir`, keyed by everything that determines it, so runs and tests
reuse it; a copy committed under rl/demo/prebuilt/ spares a fresh clone the fine-tuning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.builtin.verifiable import exact_match
from rl.data.config import TaskConfig
from rl.data.tasks import AdditionTask
from rl.demo import prebuilt
from rl.demo.config import ModelConfig, WarmStartConfig
from rl.demo.swarm_demos import SwarmDemos, demo_format
from rl.demo.tiny_model import MOE_BUILDERS, TOKENIZERS, create_tiny_qwen2, save_hf
from rl.sample import Problem

log = logging.getLogger(__name__)
_RECIPE_VERSION = 3  # bump when this recipe changes, to invalidate cached models
# Warm-start problems come from a stream disjoint from the RL stream (different seed offset).
_WARM_START_SEED_OFFSET = 7919
_EVAL_START = 10_000_000  # evaluation problems: a range of the stream training never reaches


def demo_model_name(model: ModelConfig, warm: WarmStartConfig, task: TaskConfig, agent=None) -> str:
    """The demo model's cache entry: `tiny-<architecture>-<task>-<digest of everything that determines it>`."""
    swarm = uses_swarm_recipe(warm, task, agent)
    shape = {k: v for k, v in dataclasses.asdict(model).items() if k != "cache_dir"}  # where it is kept is no part of it
    key = json.dumps([_RECIPE_VERSION, shape, dataclasses.asdict(warm), dataclasses.asdict(task),
                      demo_format(agent) if swarm else None], sort_keys=True, default=str)
    return f"tiny-{model.architecture}-{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def demo_model_path(model: ModelConfig, warm: WarmStartConfig, task: TaskConfig, agent=None) -> str:
    """Build (or reuse from cache) the warm-started demo model and return its directory. `agent`: the
    run's rollout.config.AgentConfig, which the swarm recipe writes its episodes with."""
    name = demo_model_name(model, warm, task, agent)
    path = os.path.abspath(os.path.join(model.cache_dir, name))
    if os.path.isfile(os.path.join(path, "warm_start.json")):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if prebuilt.restore(name, tmp):  # a committed copy of this very model (rl/demo/prebuilt/)
        log.info("warm start: the committed %s", name)
    else:
        _build(tmp, model, warm, task, agent if uses_swarm_recipe(warm, task, agent) else None)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def policy_model_path(config) -> str:
    """The run's (rl.config.Config) initial policy: `model.path`, or the demo model built for it."""
    return config.model.path or demo_model_path(config.model, config.warm_start, config.task, config.agent)


def uses_swarm_recipe(warm: WarmStartConfig, task: TaskConfig, agent) -> bool:
    """The swarm's demonstrations are the warm start of a PARL run on wide search; else the addition task's."""
    return bool(warm.steps and task.name == "wide_search" and agent is not None and agent.swarm.enabled)


def _build(path: str, model: ModelConfig, warm: WarmStartConfig, task: TaskConfig, swarm_agent) -> None:
    """Random init, then the recipe's supervised fine-tuning; its report is warm_start.json."""
    if model.architecture == "qwen2":
        create_tiny_qwen2(path, model.hidden_size, model.num_layers, model.num_attention_heads,
                          model.num_key_value_heads, model.intermediate_size, seed=task.seed,
                          characters=TOKENIZERS[model.tokenizer], max_position_embeddings=model.max_position_embeddings)
    else:  # the tiny MoE builders' shapes
        MOE_BUILDERS[model.architecture](path, seed=task.seed, characters=TOKENIZERS[model.tokenizer],
                                         max_position_embeddings=model.max_position_embeddings)
    if swarm_agent is not None:
        report = warm_start_swarm(path, warm, swarm_agent, task)
    else:
        report = warm_start(path, warm, AdditionTask(task.digits, task.seed + _WARM_START_SEED_OFFSET,
                                                     task.reverse_answer))
    with open(os.path.join(path, "warm_start.json"), "w") as f:
        json.dump(report, f, indent=2)


def _padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 where not trained on, and on the padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    lab = torch.full((len(examples), width), -100)
    for i, (row, labels) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        lab[i, : len(labels)] = torch.tensor(labels)
    return ids, lab


def _addition_examples(problems: list[Problem], tokenizer) -> list[tuple[list[int], list[int]]]:
    """Prompt and answer with its end-of-sequence token, trained on the answer only."""
    out = []
    for p in problems:
        prompt = tokenizer.encode(p.prompt)
        answer = tokenizer.encode(p.reference) + [tokenizer.eos_token_id]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[Problem], sample: bool, max_new_tokens: int = 8) -> float:
    """Exact-match accuracy of HF `generate`: sampled at temperature 1, or greedy."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = model.generate(**enc, **options, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(exact_match(t, p.reference) for t, p in zip(texts, problems)) / len(problems)


def fine_tune(model, tokenizer, cfg: WarmStartConfig, examples: Callable[[int], list]) -> torch.Tensor:
    """`cfg.steps` AdamW steps with a cosine decay on `examples(step)` (a batch of (ids, labels)), with
    the config's label smoothing; returns the last batch's loss."""
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, cfg.steps))
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(1, cfg.steps + 1):
        ids, labels = _padded(examples(step), tokenizer.pad_token_id)
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
    return loss.detach()


def _load(path: str, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def warm_start(path: str, cfg: WarmStartConfig, task: AdditionTask) -> dict:
    """Train the model at `path` in place; report its greedy and sampled accuracy on held-out problems."""
    model, tokenizer = _load(path, task.seed)
    fine_tune(model, tokenizer, cfg, lambda step: _addition_examples(task.batch(step * cfg.batch_size, cfg.batch_size),
                                                                      tokenizer))
    eval_problems = task.batch(_EVAL_START, cfg.eval_prompts)
    report = {"steps": cfg.steps, "label_smoothing": cfg.label_smoothing,
              "greedy_accuracy": accuracy(model, tokenizer, eval_problems, sample=False),
              "sampled_accuracy": accuracy(model, tokenizer, eval_problems, sample=True)}
    log.info("warm start done: %s", report)
    save_hf(model, tokenizer, path)
    return report


def warm_start_swarm(path: str, cfg: WarmStartConfig, agent, task: TaskConfig) -> dict:
    """Train the model at `path` in place on demonstrated swarm episodes (both roles); report its
    teacher-forced accuracy on held-out demonstrations: per written token, and per whole episode."""
    model, tokenizer = _load(path, task.seed)
    seed = task.seed + _WARM_START_SEED_OFFSET
    demos = SwarmDemos(tokenizer, agent, task.options, cfg.swarm, seed)
    loss = fine_tune(model, tokenizer, cfg, lambda step: [(e.ids, e.labels) for e in
                                                          demos.batch(step * cfg.batch_size, cfg.batch_size)])
    held_out = demos.batch(_EVAL_START, cfg.eval_prompts)
    with torch.no_grad():
        ids, labels = _padded([(e.ids, e.labels) for e in held_out], tokenizer.pad_token_id)
        right = (model(input_ids=ids).logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == -100)
    written = labels[:, 1:] != -100
    report = {"steps": cfg.steps, "label_smoothing": cfg.label_smoothing, "final_loss": loss.item(),
              "token_accuracy": (right & written).sum().item() / written.sum().item(),
              "episode_accuracy": right.all(dim=1).float().mean().item()}
    log.info("warm start done: %s", report)
    save_hf(model, tokenizer, path)
    return report
