"""Closed-loop critic data (Kimi K2 §3.2.2): verifiable rewards grade the judge.

From groups whose task has a verifiable reward, pairs (a verified-correct response, a verified-wrong
one) to the same prompt are built; the judge compares each pair in both orders, and its agreement with
the verifier (the share of parsed judgments that pick the correct response) is a health metric of the
critic, logged every step. The pairs, with the judge's verdicts, are appended to a JSONL file
(`datasets.load_dataset("json", data_files=...)` reads it) for refining the critic: preference pairs
for SFT or DPO, or RL with the verified label as the reward.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Optional

from rewards.builtin.self_critique import judge_prompt, parse_verdict, rubric_bundle
from rl.sample import by_group


@dataclass
class CriticPair:
    prompt: str
    chosen: str  # verified correct
    rejected: str  # verified wrong
    task_type: str
    step: int
    verdicts: list[Optional[str]] = field(default_factory=list)  # judge: chosen first, then rejected first


def verified_pairs(samples: list, correct_threshold: float, max_pairs: int, step: int, seed: int = 0) -> list[CriticPair]:
    """Up to `max_pairs` (correct, wrong) pairs from groups holding both, by `task_reward`."""
    pairs = []
    for members in by_group(samples).values():
        right = [s for s in members if s.task_reward >= correct_threshold]
        wrong = [s for s in members if s.task_reward < correct_threshold]
        pairs += [CriticPair(a.prompt, a.response, b.response, a.task_type, step) for a, b in itertools.product(right, wrong)]
    random.Random(seed).shuffle(pairs)
    return pairs[:max_pairs]


async def judge_pairs(judge, pairs: list[CriticPair]) -> dict[str, float]:
    """Judge every pair in both orders (filling `verdicts`); returns the agreement metrics."""
    async def one(pair: CriticPair, chosen_first: bool) -> Optional[str]:
        first, second = (pair.chosen, pair.rejected) if chosen_first else (pair.rejected, pair.chosen)
        try:
            return parse_verdict(await judge(judge_prompt(pair.prompt, first, second, rubric_bundle())))
        except Exception:  # noqa: BLE001 - a failed request is an unparseable judgment
            return None

    verdicts = await asyncio.gather(*(one(p, order) for p in pairs for order in (True, False)))
    agree = parsed = 0
    for i, pair in enumerate(pairs):
        pair.verdicts = list(verdicts[2 * i:2 * i + 2])
        for verdict, correct in zip(pair.verdicts, ("A", "B")):
            if verdict is not None:
                parsed += 1
                agree += verdict == correct
    return {"critic_agreement": agree / parsed if parsed else float("nan"), "critic_pairs": float(len(pairs)),
            "critic_unparseable": float(2 * len(pairs) - parsed)}


def append_jsonl(records: list, path: str) -> None:
    """Append records (dataclasses or dicts) to a JSONL file, one per line."""
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(asdict(record) if is_dataclass(record) else record) + "\n")
