"""Rewards: plug-in reward functions (registry.py), how a batch is scored without blocking the loop
(runner.py, isolation.py), and the built-in rewards: verifiable answers (verifiable.py) and
instruction-following checks (instructions.py)."""
from rewards.registry import reward

__all__ = ["reward"]
