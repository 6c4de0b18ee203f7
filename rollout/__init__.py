"""Rollout engines: SGLang behind a Ray actor, token-in/token-out."""
