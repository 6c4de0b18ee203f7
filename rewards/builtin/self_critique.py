"""The self-critique rubric reward (Kimi K2 §3.2.2): a judge compares the K responses to a prompt
pairwise, in both orders, against a bundle of rubrics; each response's reward is its win rate.

Undisclosed by Kimi and chosen here (docs/kimi-methods.md §6): the scalar is the win rate with ties counted
as half, (wins + ties / 2) / comparisons; every pair is judged in both orders (position bias cancels
out of the win rate); judgments that cannot be parsed (or whose request failed) are counted and left
out; a response with no parsed comparison scores a neutral 0.5, with 0 in its "comparisons"
sub-score. The judge is, by default, the current policy itself (`base_url: policy`: the run's own
SGLang rollout engine with the weights of the last push, behind `rollout/openai_gateway.py`), or any
server with the OpenAI-compatible API (SGLang's `launch_server` serving a frozen judge, vLLM, a hosted
model), reached with bounded concurrency and a timeout per request.

Rubric bundle: the core and prescriptive rubrics below (after K2 appendix F, in our words), plus the
prompt's own rubrics from `sample.metadata["rubrics"]`.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import re
from typing import Optional

from rewards.registry import reward

CORE_RUBRICS = (
    "Clarity and relevance: the response is concise, addresses what the user actually asked, uses a "
    "format that fits, avoids long lists where prose would do, and commits to one answer when the "
    "user needs a choice.",
    "Conversational fluency: the response is coherent, engages at a suitable level, asks a follow-up "
    "question only when it helps, and matches the user's tone.",
    "Grounded and objective: no commentary about the question itself and no flattery of the user.",
)
PRESCRIPTIVE_RUBRICS = (
    "No opening praise: the response does not start by complimenting the question or the user.",
    "No self-justification: the response does not explain why it is a good response.",
)
VERDICT = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.IGNORECASE)


def rubric_bundle(prompt_rubrics: Optional[list[str]] = None) -> list[str]:
    return [*CORE_RUBRICS, *PRESCRIPTIVE_RUBRICS, *(prompt_rubrics or [])]


def judge_prompt(prompt: str, first: str, second: str, rubrics: list[str]) -> str:
    listed = "\n".join(f"{i}. {r}" for i, r in enumerate(rubrics, start=1))
    return ("You are judging two responses to the same request against these rubrics:\n"
            f"{listed}\n\n[Request]\n{prompt}\n\n[Response A]\n{first}\n\n[Response B]\n{second}\n\n"
            "Compare them rubric by rubric, then give your verdict on the last line as [[A]] if A is "
            "better, [[B]] if B is better, or [[TIE]].")


def parse_verdict(text: str) -> Optional[str]:
    """'A', 'B' or 'tie' from the judge's last verdict marker; None when there is none."""
    found = VERDICT.findall(text or "")
    if not found:
        return None
    last = found[-1].upper()
    return "tie" if last == "TIE" else last


def ordered_pairs(k: int, max_pairs: Optional[int] = None, seed: int = 0) -> list[tuple[int, int]]:
    """Every unordered pair of the K responses (or a seeded sample of `max_pairs`), in both orders."""
    pairs = list(itertools.combinations(range(k), 2))
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = random.Random(seed).sample(pairs, max_pairs)
    return [p for i, j in pairs for p in ((i, j), (j, i))]


def win_rates(k: int, judgments: list[tuple[int, int, Optional[str]]]) -> tuple[list[Optional[float]], list[int], int]:
    """From (first, second, verdict) triples: each response's win rate (ties count half; None when it
    has no parsed comparison), its number of parsed comparisons, and the number unparseable."""
    points, counts, unparseable = [0.0] * k, [0] * k, 0
    for first, second, verdict in judgments:
        if verdict is None:
            unparseable += 1
            continue
        counts[first] += 1
        counts[second] += 1
        if verdict == "tie":
            points[first] += 0.5
            points[second] += 0.5
        else:
            points[first if verdict == "A" else second] += 1.0
    return [p / c if c else None for p, c in zip(points, counts)], counts, unparseable


class Judge:
    """An OpenAI-compatible endpoint: chat completions (models with a chat template) or plain
    completions (base models)."""

    def __init__(self, base_url: str, model: str = "default", api: str = "chat", max_tokens: int = 512,
                 temperature: float = 0.0, timeout_s: float = 60.0, concurrency: int = 8,
                 extra_body: Optional[dict] = None):
        """`extra_body`: server-specific request fields, e.g. SGLang's {"regex": ...} to constrain the
        verdict."""
        from openai import AsyncOpenAI

        if api not in ("chat", "completions"):
            raise ValueError(f"judge api must be chat or completions (got {api!r})")
        self.client = AsyncOpenAI(base_url=base_url, api_key="not-needed", timeout=timeout_s, max_retries=0)
        self.model, self.api, self.max_tokens, self.temperature = model, api, max_tokens, temperature
        self.timeout_s, self.semaphore = timeout_s, asyncio.Semaphore(concurrency)
        self.extra_body = extra_body or None

    async def __call__(self, text: str) -> str:
        async with self.semaphore:
            if self.api == "chat":
                reply = await asyncio.wait_for(self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": text}], max_tokens=self.max_tokens,
                    temperature=self.temperature, extra_body=self.extra_body), self.timeout_s)
                return reply.choices[0].message.content or ""
            reply = await asyncio.wait_for(self.client.completions.create(
                model=self.model, prompt=text, max_tokens=self.max_tokens, temperature=self.temperature,
                extra_body=self.extra_body), self.timeout_s)
            return reply.choices[0].text or ""


POLICY = "policy"
_policy_url: Optional[str] = None  # the run's OpenAI gateway to its rollout engine (`use_policy`)


def use_policy(base_url: Optional[str]) -> None:
    """Register the current policy's OpenAI-compatible endpoint (the RL loop's gateway)."""
    global _policy_url
    _policy_url = base_url


def policy_url() -> Optional[str]:
    """The current policy's OpenAI-compatible base URL during a run (for users' own judge rewards)."""
    return _policy_url


def make_judge(base_url: str = POLICY, model: str = "default", api: str = "chat", max_tokens: int = 512,
               concurrency: int = 8, request_timeout_s: float = 60.0, extra_body: Optional[dict] = None) -> Judge:
    """A judge at `base_url`, or the current policy ("policy": the run's own rollout engine)."""
    if base_url == POLICY:
        if _policy_url is None:
            raise RuntimeError("self_critique: base_url 'policy' needs the RL loop's gateway to its rollout "
                               "engine; outside a run give a judge server's base_url")
        base_url = _policy_url
    return Judge(base_url, model, api, max_tokens, 0.0, request_timeout_s, concurrency, extra_body)


async def judge_group(judge, samples: list, max_pairs: Optional[int] = None, seed: int = 0) -> list:
    """Judge one group; returns one (score, sub-scores) per sample. A request that fails counts as an
    unparseable judgment (and is logged as a sub-score), so one bad request does not lose the group."""
    rubrics = rubric_bundle(samples[0].metadata.get("rubrics"))
    pairs = ordered_pairs(len(samples), max_pairs, seed)

    async def one(first: int, second: int) -> tuple[int, int, Optional[str], bool]:
        text = judge_prompt(samples[0].prompt, samples[first].response, samples[second].response, rubrics)
        try:
            return first, second, parse_verdict(await judge(text)), False
        except Exception:  # noqa: BLE001 - a failed request is an unparseable judgment
            return first, second, None, True

    results = await asyncio.gather(*(one(i, j) for i, j in pairs))
    failed = sum(r[3] for r in results)
    rates, counts, unparseable = win_rates(len(samples), [r[:3] for r in results])
    return [(0.5 if rate is None else rate, {"comparisons": float(n), "unparseable": float(unparseable),
                                             "failed_requests": float(failed)})
            for rate, n in zip(rates, counts)]


@reward("self_critique", per_group=True)
async def self_critique(samples, base_url: str = POLICY, max_pairs: Optional[int] = None, **judge_kwargs):
    """`judge_kwargs`: model, api, max_tokens, concurrency, request_timeout_s, extra_body (`make_judge`)."""
    judge = make_judge(base_url, **judge_kwargs)
    return await judge_group(judge, samples, max_pairs, seed=samples[0].group_id)
