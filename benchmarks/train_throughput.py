"""Training throughput of the Megatron engine per parallel layout, and offload/onload cost.

For each model and layout it spawns the layout's processes (gloo on CPU, NCCL on CUDA), runs one
warm-up and `--steps` timed `train_step`s on the same batch, and reports training tokens/s (response
and prompt tokens actually in the batch, padding excluded). Two references are measured in the same
run: the engine's own single-process layout, and HF transformers (forward + backward + AdamW on the
same weights and padded batch, in one process), the implementation we did not write. Rank 0 also
times an offload + onload of the whole training state.

    python benchmarks/train_throughput.py            # tiny dense + MoE models, all 2-process layouts
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rl.algo.advantages import group_advantages  # noqa: E402
from rl.algo.objectives import ObjectiveSettings  # noqa: E402
from rl.sample import Sample  # noqa: E402

LAYOUTS = {
    "1 process": (1, {}),
    "TP=2": (2, dict(tensor_parallel_size=2)),
    "PP=2": (2, dict(pipeline_parallel_size=2)),
    "DP=2": (2, {}),
    "EP=2 (DP=2)": (2, dict(expert_parallel_size=2)),
}


def batch(groups: int, k: int, prompt_len: int, response_len: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for group in range(groups):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
        for i in range(k):
            response = torch.randint(2, vocab, (response_len - i % 4,), generator=g).tolist()
            samples.append(Sample(group_id=group, prompt="", prompt_ids=prompt, reference="",
                                  response_ids=response, reward=float(i % 2)))
    group_advantages(samples)
    for s in samples:
        s.old_logprobs = [0.0] * len(s.response_ids)
    return samples


def _worker(rank, world, path, port, layout, steps, shape, out):
    from rl.trainer.config import TrainerConfig
    from rl.trainer.engine import TrainingEngine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = TrainerConfig(world_size=world, lr=1e-5, lr_warmup_steps=0, lr_decay="constant", **layout)
    engine = TrainingEngine(path, config, rank=rank, master_port=port)
    samples = batch(*shape)
    engine.train_step(samples, ObjectiveSettings(tau=0.01))  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step(samples, ObjectiveSettings(tau=0.01))
        times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times)}
    if rank == 0 and world == 1:
        off = engine.offload()
        on = engine.onload()
        result.update(offload_seconds=off["seconds"], onload_seconds=on["seconds"],
                      moved=off["moved_bytes"], held_during=off["device_bytes_after"],
                      held_before=off["device_bytes_before"])
    if rank == 0:
        torch.save(result, out)
    engine.shutdown()


def run_layout(path, world, layout, steps, shape) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".pt")
    mp.start_processes(_worker, args=(world, path, port, layout, steps, shape, out), nprocs=world,
                       join=True, start_method="spawn")
    return torch.load(out)


def hf_reference(path, steps, shape) -> float:
    """Median seconds of forward + backward + AdamW in HF transformers on the same padded batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    samples = batch(*shape)
    width = max(len(s.tokens) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.tokens)] = torch.tensor(s.tokens)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        logits = model(ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        logp.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from rl.demo.tiny_model import create_tiny_qwen2, create_tiny_qwen3_moe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    shape = (args.groups, args.k, 16, 48, 64)
    tokens = sum(len(s.tokens) for s in batch(*shape))
    root = tempfile.mkdtemp()
    models = {
        "dense Qwen2 (h256, 4 layers)": create_tiny_qwen2(os.path.join(root, "dense"), hidden_size=256, num_layers=4,
                                                           num_attention_heads=8, num_key_value_heads=4,
                                                           intermediate_size=704),
        "MoE Qwen3 (h128, 2 layers, 4 experts top-2)": create_tiny_qwen3_moe(os.path.join(root, "moe"), hidden_size=128),
    }
    print(f"batch: {len(batch(*shape))} samples, {tokens} tokens; median of {args.steps} steps after 1 warm-up; "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {os.cpu_count()} cores")
    for name, path in models.items():
        hf_seconds = hf_reference(path, args.steps, shape)
        print(f"\n{name}\n{'layout':<14}{'s/step':>9}{'tokens/s':>10}{'vs 1 proc':>11}{'vs HF':>8}")
        print(f"{'HF transformers':<14}{hf_seconds:>9.3f}{tokens / hf_seconds:>10.0f}{'':>11}{1.0:>8.2f}")
        single = None
        for label, (world, layout) in LAYOUTS.items():
            if layout.get("expert_parallel_size", 1) > 1 and "MoE" not in name:
                continue
            result = run_layout(path, world, layout, args.steps, shape)
            single = single or result
            seconds = result["seconds"]
            print(f"{label:<14}{seconds:>9.3f}{tokens / seconds:>10.0f}{single['seconds'] / seconds:>11.2f}"
                  f"{hf_seconds / seconds:>8.2f}")
        moved = single["moved"]
        print(f"offload {single['offload_seconds'] * 1e3:.1f} ms + onload {single['onload_seconds'] * 1e3:.1f} ms; "
              f"moved params {moved['params'] / 2**20:.2f} MiB, grads {moved['grads'] / 2**20:.2f} MiB, "
              f"optimizer {moved['optimizer'] / 2**20:.2f} MiB; device bytes held "
              f"{sum(single['held_before'].values()) / 2**20:.2f} MiB -> {sum(single['held_during'].values())} B")


if __name__ == "__main__":
    main()
