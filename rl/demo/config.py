"""The policy model (`model`: a HuggingFace directory, or the project's tiny demo model) and the demo
model's supervised warm start (`warm_start`). Bounds sit in each field's metadata, checked by
rl/config.py before any actor starts."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from rl.demo.tiny_model import TOKENIZERS


@dataclass
class ModelConfig:
    # HF model directory (config.json, safetensors, tokenizer). None: build the project's tiny demo
    # model (random init + supervised warm start on the demo task) and cache it under cache_dir.
    path: Optional[str] = None
    cache_dir: str = ".cache/models"
    # Shape of the tiny demo model, used only when path is None.
    hidden_size: int = field(default=128, metadata={"gt": 0})
    num_layers: int = field(default=2, metadata={"gt": 0})
    num_attention_heads: int = field(default=4, metadata={"gt": 0})
    num_key_value_heads: int = field(default=2, metadata={"gt": 0})
    intermediate_size: int = field(default=256, metadata={"gt": 0})
    # demo: 62 symbols (the addition task's) | printable: printable ASCII (tool calls)
    tokenizer: str = field(default="demo", metadata={"choices": tuple(sorted(TOKENIZERS))})
    max_position_embeddings: int = field(default=256, metadata={"gt": 0})
    # qwen2 (dense, the shape above) | qwen3_moe | deepseek_v3 (the tiny MoE builders' own shapes,
    # rl/demo/tiny_model.py: 4 or 8 experts, top-2; with the tokenizer and context above; conf/moe_demo.yaml)
    architecture: str = field(default="qwen2", metadata={"choices": ("qwen2", "qwen3_moe", "deepseek_v3")})

    def check(self) -> None:
        if self.path is not None:
            if not os.path.isdir(self.path):
                raise ValueError(f"path: directory does not exist (got {self.path!r})")
            if not os.path.isfile(os.path.join(self.path, "config.json")):
                raise ValueError(f"path: has no config.json (expected a HuggingFace model directory) (got {self.path!r})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: must be divisible by model.num_attention_heads (got {self.hidden_size!r})")


@dataclass
class WarmStartConfig:
    """Supervised warm start of the demo model (see rl/demo/warm_start.py).

    Trained to convergence with label smoothing, the policy's greedy answers are right while its
    sampled (temperature 1) answers are mostly wrong; RL has to concentrate the distribution.
    """
    label_smoothing: float = field(default=0.3, metadata={"ge": 0, "lt": 1})
    steps: int = field(default=1200, metadata={"ge": 0})  # with a cosine learning-rate decay to zero
    batch_size: int = 64
    lr: float = field(default=1e-3, metadata={"gt": 0})
    eval_prompts: int = 256
