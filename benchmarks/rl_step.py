"""One RL step, side by side: Tandem, the bare engines under it, TRL's GRPOTrainer and a plain HF loop.

Every side gets the same model (fp32), the same prompts (the run's prompt stream: step s draws
positions s*P .. s*P+P-1), K samples a prompt, the same cap on new tokens, the same reward
(math_verify) and the same number of torch threads, and runs a warm-up step and then `--steps` timed
steps in a fresh process of its own. Reported: the median step and its parts, and ratios.

- tandem: the RL loop (rl/loop.py) on a local Ray cluster: generate + score, train, weight sync.
- sglang: one `sglang.Engine.generate` of the step's P*K requests (with logprobs, as Tandem asks), on an
  empty prefix cache (an RL step's engine has new weights); also reported: the same on the cache the
  previous step left, and on an empty cache with each shared prompt prefilled first (as Tandem does).
- megatron: one forward + backward + optimizer step of the sglang side's sequences: Megatron's
  forward-backward schedule and its own cross entropy over every position (as in pre-training) on the
  trainer's model and optimizer (no objective, no pi_old, no trimming of the logits).
- trl: `trl.GRPOTrainer` (beta 0, one iteration: no reference model, no old-logprob pass; HF generate).
- hf: a plain loop: HF `generate`, reward, one forward + backward + AdamW step of the same loss.

    python benchmarks/rl_step.py --preset smollm2     # SmolLM2-135M-Instruct on word problems (make model)
    python benchmarks/rl_step.py --preset demo        # the tiny demo model on addition
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIDES = ("tandem", "sglang", "megatron", "trl", "hf")
PRESETS = {  # hydra config name and the overrides that give the batch
    "smollm2": ("smollm2_math", dict(prompts=16, samples=4, tokens=24)),
    "demo": ("config", dict(prompts=64, samples=8, tokens=8)),
}


# --- what every side shares ------------------------------------------------------------------------
def load(args):
    """The run's Config for the preset and batch, its model path and tokenizer."""
    from transformers import AutoTokenizer

    from rl.demo.warm_start import policy_model_path
    from rl.train import preset_config

    name, _ = PRESETS[args.preset]
    overrides = [f"steps={args.warmup + args.steps}", f"rollout.prompts_per_step={args.prompts}",
                 f"rollout.samples_per_prompt={args.samples}", f"rollout.max_new_tokens={args.tokens}",
                 "eval.every=0", "logging.wandb_mode=disabled", f"seed={args.seed}",
                 f"cluster.threads_per_actor={args.threads}"]
    config = preset_config(name, overrides)
    path = policy_model_path(config)
    return config, path, AutoTokenizer.from_pretrained(path)


def step_prompts(config, tokenizer, step: int):
    """Step `step`'s prompts, as the loop draws them: [(Prompt, text, prompt ids)]."""
    from rl.data.prompts import PromptSource, encode_prompt

    source = PromptSource(config.data, config.task, config.seed)
    n = config.rollout.prompts_per_step
    return [(p, *encode_prompt(tokenizer, p)) for p in source.prompts(step * n, n)]


def score(response: str, reference: str) -> float:
    from rewards.builtin.verifiable import math_verify_reward
    from rl.sample import Sample

    return float(math_verify_reward(Sample(group_id=0, prompt="", prompt_ids=[], reference=reference,
                                           response=response)))


def advantages(rewards: list[float], k: int) -> list[float]:
    out = []
    for g in range(0, len(rewards), k):
        mean = sum(rewards[g:g + k]) / k
        out += [r - mean for r in rewards[g:g + k]]
    return out


def timed_steps(args, one_step) -> list[dict]:
    """`one_step(step) -> dict of part seconds` for warm-up + timed steps; the timed ones, with "step"."""
    rows = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        parts = one_step(step)
        rows.append({"step": time.perf_counter() - start, **parts})  # a side may time its step itself
    return rows[args.warmup:]


# --- the sides -------------------------------------------------------------------------------------
def side_tandem(args) -> list[dict]:
    import ray

    from rl.actors import Actors
    from rl.loop import RLLoop

    config, path, tokenizer = load(args)
    actors = Actors.start(config, path)
    try:
        loop = RLLoop(config, actors, tokenizer)

        def one_step(_step):
            m = loop.step()
            return {"generate": m["rollout_seconds"], "reward": m["reward_seconds"], "train": m["train_seconds"],
                    "sync": m["sync_seconds"], "tokens": m["response_length"] * len(loop.last_samples),
                    "loop_step": m["step_seconds"]}
        rows = timed_steps(args, one_step)
        loop.gateway.close()
        return rows
    finally:
        actors.shutdown()
        ray.shutdown()


def side_sglang(args) -> list[dict]:
    import sglang

    from rollout.sglang import cpu as sglang_cpu
    from rollout.sglang.engine import prefill_shared_prompts

    config, path, tokenizer = load(args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sglang_cpu.apply()
    engine = sglang.Engine(model_path=path, dtype="float32", max_total_tokens=config.rollout.max_total_tokens,
                           random_seed=args.seed, log_level="error", sleep_on_idle=True,
                           **sglang_cpu.engine_kwargs(1))
    sequences = []

    def step_ids(step):
        return [p_ids for _p, _text, p_ids in step_prompts(config, tokenizer, step) for _ in range(args.samples)]

    def one_step(step):
        ids = step_ids(step)
        params = {"temperature": config.rollout.temperature, "max_new_tokens": args.tokens}
        outs = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)
        sequences.append([(list(i), list(o["output_ids"])) for i, o in zip(ids, outs)])
        return {"tokens": sum(len(o["output_ids"]) for o in outs)}

    def step_three_ways(step):
        """The step's requests three times: on the cache the previous step left (the shared prefixes of
        its prompts, as a long-running server's would hold them); on an empty cache with each shared
        prompt prefilled once first, as Tandem's engine does (rollout.prefill_shared_prompts); and, as
        the step's time, on an empty cache: after a weight update an RL step's engine must drop its
        cached prefixes, and the bare engine, used as it comes, prefills every copy of a prompt."""
        def timed(prepare=None) -> tuple[float, dict]:
            if prepare is not None:
                engine.flush_cache()
            start = time.perf_counter()
            if prepare == "prefill":
                prefill_shared_prompts(engine, step_ids(step))
            parts = one_step(step)
            return time.perf_counter() - start, parts
        kept_cache, _ = timed()
        prefilled, _ = timed("prefill")
        del sequences[-2:]  # the timed (last) run's sequences are the megatron side's
        cold, parts = timed("flush")
        return {**parts, "step": cold, "kept_cache": kept_cache, "prefilled": prefilled}
    rows = timed_steps(args, step_three_ways)
    engine.shutdown()
    with open(os.path.join(args.work, "sequences.json"), "w") as f:
        json.dump(sequences, f)
    return rows


def side_megatron(args) -> list[dict]:
    """Megatron's own step: its forward-backward schedule with labels (its cross entropy over every
    position, as in pre-training), then the optimizer; the trainer's model and optimizer, nothing of ours."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rl.sample import Sample
    from rl.trainer.engine import TrainingEngine
    from rl.trainer.micro_batches import split_micro_batches
    from tests.helpers import pick_port

    config, path, _tokenizer = load(args)
    with open(os.path.join(args.work, "sequences.json")) as f:
        sequences = json.load(f)
    engine = TrainingEngine(path, config.trainer, master_port=pick_port(), device="cpu", threads=args.threads)

    def loss_func(batch, per_token):
        mask = batch.loss_mask
        return (per_token[:, :-1] * mask).sum() / mask.sum().clamp(min=1), {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
        labels = torch.nn.functional.pad(batch.tokens[:, 1:], (0, 1))
        return model(input_ids=batch.tokens, position_ids=positions, attention_mask=None, labels=labels), \
            partial(loss_func, batch)

    def one_step(step):
        step_sequences = sequences[step % len(sequences)]
        samples = [Sample(group_id=i, prompt="", prompt_ids=p, reference="", response_ids=r)
                   for i, (p, r) in enumerate(step_sequences)]
        batches = split_micro_batches(samples, None, 1, 0, engine.micro_batch_tokens)
        engine.ddp.train()
        engine.ddp.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[engine.ddp],
            num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=False)
        for p in engine.model.parameters():
            p.grad = p.main_grad
        engine.optimizer.step()
        return {"tokens": sum(len(r) for _p, r in step_sequences)}
    return timed_steps(args, one_step)


def side_trl(args) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config, path, tokenizer = load(args)
    torch.set_num_threads(args.threads)
    prompts = [p for step in range(args.warmup + args.steps) for p in step_prompts(config, tokenizer, step)]
    rows = [{"prompt": p.messages if p.messages else text, "reference": p.reference} for p, text, _ids in prompts]

    def reward(completions, reference, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score(t, r) for t, r in zip(texts, reference)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            self.start = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            times.append(time.perf_counter() - self.start)

    batch = args.prompts * args.samples
    settings = GRPOConfig(
        output_dir=args.work, per_device_train_batch_size=args.reference_rows,
        gradient_accumulation_steps=batch // args.reference_rows,
        num_generations=args.samples, max_completion_length=args.tokens, beta=0.0, num_iterations=1,
        temperature=config.rollout.temperature, learning_rate=config.trainer.lr, max_steps=args.warmup + args.steps,
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False, save_strategy="no", seed=args.seed,
        shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=settings, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    return [{"step": t} for t in times[args.warmup:]]


def side_hf(args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    config, path, tokenizer = load(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.trainer.lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def one_step(step):
        prompts = step_prompts(config, tokenizer, step)
        ids = [p_ids for _p, _t, p_ids in prompts for _ in range(args.samples)]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])  # left-padded for generate
        attention = (torch.arange(width)[None] >= torch.tensor([width - len(i) for i in ids])[:, None]).long()
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, top_k=0,
                                 temperature=config.rollout.temperature, max_new_tokens=args.tokens, pad_token_id=pad)
        generate = time.perf_counter() - start
        completion = out[:, width:]
        done = (completion == tokenizer.eos_token_id).cumsum(-1)
        completion_mask = ((done == 0) | ((done == 1) & (completion == tokenizer.eos_token_id))).float()
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        rewards = [score(t, prompts[i // args.samples][0].reference) for i, t in enumerate(texts)]
        adv = torch.tensor(advantages(rewards, args.samples))
        start = time.perf_counter()
        model.train()
        mask = torch.cat([attention, completion_mask.long()], dim=1)
        for rows in torch.arange(len(ids)).split(args.reference_rows):  # gradient accumulation
            logits = model(input_ids=out[rows], attention_mask=mask[rows]).logits[:, width - 1:-1]
            logprobs = torch.log_softmax(logits / config.rollout.temperature, -1).gather(
                -1, completion[rows][..., None]).squeeze(-1)
            loss = -(adv[rows, None] * logprobs * completion_mask[rows]).sum() / completion_mask.sum()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return {"generate": generate, "train": time.perf_counter() - start, "tokens": completion_mask.sum().item()}
    return timed_steps(args, one_step)


# --- the driver ------------------------------------------------------------------------------------
def run_side(side: str, args) -> list[dict]:
    out = os.path.join(args.work, f"{side}.json")
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--out", out, "--work", args.work,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("preset", "prompts", "samples", "tokens",
                                                                       "steps", "warmup", "threads", "seed",
                                                                       "reference_rows")]]
    from rl.trainer.megatron_cpu import PROCESS_ENV  # every side gets the allocator settings Tandem's processes get

    subprocess.run(command, check=True, env={**os.environ, **PROCESS_ENV, "OMP_NUM_THREADS": str(args.threads)})
    with open(out) as f:
        return json.load(f)


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, list[dict]], args) -> str:
    tandem = median(results["tandem"], "step")
    engines = median(results["sglang"], "step") + median(results["megatron"], "step")
    lines = [f"Preset {args.preset}: {args.prompts} prompts x {args.samples} samples, up to {args.tokens} new tokens, "
             f"fp32, {args.threads} threads a side; median of {args.steps} steps after {args.warmup} warm-up; "
             f"trl and hf: {args.reference_rows} sequences a forward/backward",
             "", "| side | step s | generate s | train s | tokens | Tandem's step / side's |", "|---|---|---|---|---|---|"]
    for side, rows in results.items():
        s = median(rows, "step")
        parts = [f"{median(rows, k):.2f}" if any(k in r for r in rows) else "-" for k in ("generate", "train")]
        tokens = f"{median(rows, 'tokens'):.0f}" if any("tokens" in r for r in rows) else "-"
        lines.append(f"| {side} | {s:.2f} | {parts[0]} | {parts[1]} | {tokens} | {tandem / s:.2f} |")
    overhead = (tandem - engines) / tandem
    lines.append("")
    for side, name in (("trl", "TRL's"), ("hf", "the plain HF loop's")):
        if side in results:
            lines.append(f"Tandem's step vs {name}: {median(results[side], 'step') / tandem:.2f}x as fast.")
    lines.append(f"Tandem over the bare engines (sglang generate + megatron step = {engines:.2f} s): "
                 f"{tandem - engines:+.2f} s, {100 * overhead:.1f}% of its step "
                 f"(its parts: reward {median(results['tandem'], 'reward'):.2f} s, "
                 f"sync {median(results['tandem'], 'sync'):.2f} s).")
    if "sglang" in results:
        kept = median(results["sglang"], "kept_cache")
        kept_overhead = (tandem - kept - median(results["megatron"], "step")) / tandem
        lines.append(f"The bare engine on the cache the previous step left (stale after a weight update): "
                     f"{kept:.2f} s; with it the overhead would be {100 * kept_overhead:.1f}%.")
        prefilled = median(results["sglang"], "prefilled")
        like = (tandem - prefilled - median(results["megatron"], "step")) / tandem
        lines.append(f"The bare engine on an empty cache with each shared prompt prefilled first (as Tandem's): "
                     f"{prefilled:.2f} s; with it the overhead would be {100 * like:.1f}%.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smollm2")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps before the timed ones (a process's first steps fault its memory in)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference-rows", type=int, default=16,
                        help="sequences per forward/backward in trl and hf (gradient accumulation over the batch)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="with --side: its JSON; else a markdown file for the table")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset][1].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.side:
        rows = globals()[f"side_{args.side}"](args)
        with open(args.out, "w") as f:
            json.dump(rows, f)
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        results = {}
        for side in args.sides.split(","):
            results[side] = run_side(side, args)
            print(f"{side}: median step {median(results[side], 'step'):.2f} s", flush=True)
    text = table(results, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
