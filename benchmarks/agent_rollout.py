"""Agentic rollout throughput: what running episodes as batched coroutines buys, against the same
SGLang engine generating single-turn responses in one batch.

A tiny random Qwen2 (printable-ASCII tokenizer) runs N calculator episodes with the format
constrained (so turns make tool calls), through the real `RolloutEngine` on one thread, as the Ray
actor serves it:

- `batched`: all N episodes concurrently; turns that arrive together go out as one
  `generate_turns` call (rollout/batching.py);
- `sequential`: one episode at a time, every turn its own call (what a plain loop over episodes does);
- `raw generate` (the reference, same run): one `generate_turns` call with N single-turn requests of
  the same turn cap and regex, no tools.

The table gives generated (sampled) tokens per second and the ratio to the raw batch.

    python benchmarks/agent_rollout.py [--episodes 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from rl.demo.tiny_model import PRINTABLE, create_tiny_qwen2
    from rl.sample import Sample
    from rollout.agents.agent_loop import AgentLimits, AgentRunner, TurnFormat
    from rollout.agents.environments.calculator import CalculatorEnvironment
    from rollout.agents.tools import turn_regex
    from rollout.batching import Batcher
    from rollout.config import RolloutConfig
    from rollout.sglang.engine import RolloutEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = create_tiny_qwen2(tmp, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, characters=PRINTABLE, max_position_embeddings=2048)
        engine = RolloutEngine(path, RolloutConfig(max_total_tokens=65536), device="cpu")
        actor = ThreadPoolExecutor(max_workers=1)  # one call at a time, as a Ray actor runs them
        limits = AgentLimits(max_turns=3, max_tokens=512, max_turn_tokens=128, max_calls_per_turn=1,
                             max_context=engine.context_length())
        fmt = TurnFormat(constrain_format=True, answer_chars=8)
        rows = []

        def run(concurrency: int) -> tuple[int, int, float, int]:
            batcher = Batcher(lambda _key, requests: actor.submit(engine.generate_turns, requests), 300)
            runner = AgentRunner(batcher.submit, engine.tokenizer, limits, fmt)
            samples = [runner.start(Sample(group_id=i, prompt=p.prompt, prompt_ids=[], reference=p.reference),
                                    CalculatorEnvironment())
                       for i, p in enumerate(CalculatorEnvironment.generate(i, 0, digits=2)
                                             for i in range(args.episodes))]
            start = time.perf_counter()
            asyncio.run(runner.run_all(samples, concurrency))
            seconds = time.perf_counter() - start
            sampled = sum(int(sum(s.loss_mask)) for s in samples)
            return sampled, sum(s.agent.turns for s in samples), seconds, batcher.batches

        env = CalculatorEnvironment()
        env.reset("What is 1+1?", "2", {})
        regex = turn_regex(env.tools(), 1, 8)
        prompt = engine.tokenizer.encode("What is 12*34+5?")
        engine.generate_turns([{"input_ids": prompt, "max_new_tokens": 8, "temperature": 1.0, "regex": regex}])  # warm
        start = time.perf_counter()
        outs = engine.generate_turns([{"input_ids": prompt, "max_new_tokens": limits.max_turn_tokens,
                                       "temperature": 1.0, "regex": regex}] * args.episodes)
        raw_seconds = time.perf_counter() - start
        raw_rate = sum(len(o["output_ids"]) for o in outs) / raw_seconds
        rows.append({"mode": "raw generate (reference)", "turns": args.episodes, "calls": 1,
                     "tokens": sum(len(o["output_ids"]) for o in outs), "seconds": raw_seconds})
        for name, concurrency in (("batched episodes", args.episodes), ("sequential episodes", 1)):
            tokens, turns, seconds, calls = run(concurrency)
            rows.append({"mode": name, "turns": turns, "calls": calls, "tokens": tokens, "seconds": seconds})
        engine.shutdown()

    print(f"\n{args.episodes} calculator episodes (constrained format, <= 3 turns), tiny Qwen2 on CPU SGLang\n")
    print("| mode | turns | engine calls | sampled tokens | seconds | tokens/s | ratio to raw |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        r["tokens_per_s"], r["ratio"] = rate, rate / raw_rate
        print(f"| {r['mode']} | {r['turns']} | {r['calls']} | {r['tokens']} | {r['seconds']:.2f} | {rate:.0f} | "
              f"{rate / raw_rate:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
