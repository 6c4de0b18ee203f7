"""Verifiable rewards: the response checked against the sample's reference answer.

- `exact_match`: equal after trimming whitespace.
- `normalized_match`: equal after Unicode NFKC, lower case, dropping punctuation and the articles
  a/an/the, and collapsing whitespace (the SQuAD answer normalisation).
- `math_verify`: the final mathematical answer is equivalent to the reference, as decided by
  HuggingFace's `math-verify` (LaTeX and plain expressions, boxed answers, sets, intervals, units).
"""
from __future__ import annotations

import logging
import re
import string
import threading
import unicodedata

from rewards.registry import reward

# math-verify warns on every call made without its SIGALRM timeouts (in threads, where the runner's
# per-call timeout bounds it instead)
logging.getLogger("math_verify").setLevel(logging.ERROR)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(response: str, reference: str) -> float:
    return 1.0 if response.strip() == reference.strip() else 0.0


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@reward("exact_match")
def exact_match_reward(sample) -> float:
    return exact_match(sample.response, sample.reference)


@reward("normalized_match")
def normalized_match_reward(sample) -> float:
    return 1.0 if normalize_answer(sample.response) == normalize_answer(sample.reference) else 0.0


@reward("math_verify")
def math_verify_reward(sample) -> float:
    """1.0 when math-verify finds the response's answer equivalent to the reference. Its own parse and
    compare timeouts use SIGALRM, which works only in a main thread (so under process isolation);
    in a thread the runner's per-call timeout bounds it instead."""
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(sample.reference, parsing_timeout=limit)
    answer = parse(sample.response, parsing_timeout=limit)
    if not gold or not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=limit) else 0.0
