"""Verifiable reward: 1.0 when the response equals the reference after trimming whitespace, else 0.0."""
from __future__ import annotations


def exact_match(response: str, reference: str) -> float:
    return 1.0 if response.strip() == reference.strip() else 0.0
