"""Instruction-following checks (deterministic, IFEval-style): length, format, required or forbidden
words, valid JSON. The checks come from the reward's config (`kwargs.checks`, the same for every prompt
of the task type) and from each prompt's own data (`sample.metadata["instructions"]`); each is a dict
with a "type" and its parameters:

    {"type": "max_words", "n": 50}        {"type": "min_words", "n": 5}
    {"type": "max_chars", "n": 280}       {"type": "min_chars", "n": 10}
    {"type": "required_words", "words": ["because"]}
    {"type": "forbidden_words", "words": ["sorry"]}
    {"type": "json"}                      (the whole response, optionally in a ``` fence, is JSON)
    {"type": "regex", "pattern": "^Answer: "}
    {"type": "starts_with", "text": "Yes"}   {"type": "ends_with", "text": "."}

The score is the fraction of checks passed (`strict`: 1.0 only when all pass); each check is logged as a
sub-score. A check of an unknown type raises, so the sample gets the fallback with the reason.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

from rewards.registry import reward

_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*)\n```$", re.DOTALL)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)?", text.lower())


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def _is_json(text: str) -> bool:
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
        return True
    except ValueError:
        return False


CHECKS: dict[str, Callable[..., bool]] = {
    "max_words": lambda r, n: len(_words(r)) <= n,
    "min_words": lambda r, n: len(_words(r)) >= n,
    "max_chars": lambda r, n: len(r) <= n,
    "min_chars": lambda r, n: len(r) >= n,
    "required_words": lambda r, words: all(_has_word(r, w) for w in words),
    "forbidden_words": lambda r, words: not any(_has_word(r, w) for w in words),
    "json": lambda r: _is_json(r),
    "regex": lambda r, pattern: re.search(pattern, r, re.MULTILINE) is not None,
    "starts_with": lambda r, text: r.lstrip().startswith(text),
    "ends_with": lambda r, text: r.rstrip().endswith(text),
}


def check(response: str, spec: dict[str, Any]) -> bool:
    params = dict(spec)
    kind = params.pop("type", None)
    if kind not in CHECKS:
        raise ValueError(f"unknown instruction check {kind!r} (known: {', '.join(sorted(CHECKS))})")
    return bool(CHECKS[kind](response, **params))


@reward("instruction_following")
def instruction_following(sample, checks: Optional[list[dict]] = None, strict: bool = False):
    specs = list(checks or []) + list(sample.metadata.get("instructions", []))
    if not specs:
        raise ValueError("no instruction checks: give kwargs.checks or the prompt's 'instructions'")
    passed = [check(sample.response, spec) for spec in specs]
    parts = {f"{i}:{spec['type']}": float(ok) for i, (spec, ok) in enumerate(zip(specs, passed))}
    score = float(all(passed)) if strict else sum(passed) / len(passed)
    return score, parts
