"""Shared fixtures: the project's tiny models (built locally, never downloaded)."""
from __future__ import annotations

import os
import socket

import pytest

from rl.data.config import TaskConfig
from rl.demo.config import ModelConfig, WarmStartConfig


@pytest.fixture(scope="session")
def demo_model() -> str:
    """The warm-started demo model the default run uses (built once, cached in .cache/models)."""
    from rl.demo.warm_start import demo_model_path

    return demo_model_path(ModelConfig(), WarmStartConfig(), TaskConfig())


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen2 (GQA, qkv bias, untied embeddings) in HF format."""
    from rl.demo.tiny_model import create_tiny_qwen2

    return create_tiny_qwen2(str(tmp_path_factory.mktemp("random-qwen2")), hidden_size=64, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, seed=3)


def pick_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a spawned gloo world's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return pick_port()


def make_samples(model_path: str, prompt: str, reference: str, responses, rewards) -> list:
    """One group of Samples for `prompt` (each response closed by EOS) with group-mean advantages."""
    from transformers import AutoTokenizer

    from rl.algo.advantages import group_advantages
    from rl.sample import Sample

    tok = AutoTokenizer.from_pretrained(model_path)
    samples = [Sample(group_id=0, prompt=prompt, prompt_ids=tok.encode(prompt), reference=reference,
                      response_ids=tok.encode(r) + [tok.eos_token_id], reward=w) for r, w in zip(responses, rewards)]
    group_advantages(samples)
    return samples


@pytest.fixture
def stub_log(tmp_path, monkeypatch) -> str:
    """A file every call to a CPU stand-in (rollout/sglang/cpu_stubs) is recorded in; it must stay empty."""
    path = str(tmp_path / "stub_calls.log")
    monkeypatch.setenv("TANDEM_CPU_STUB_LOG", path)
    return path


def stub_calls(path: str) -> list[str]:
    return open(path).read().split() if os.path.exists(path) else []
