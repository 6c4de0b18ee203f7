"""Reward functions. Each takes a response string and the reference answer and returns a float."""
from rewards.exact_match import exact_match

__all__ = ["exact_match"]
