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
class SwarmDemoConfig:
    """The PARL swarm demo's warm start on wide search (rl/demo/swarm_demos.py): how the demonstrated
    orchestrator spreads a task's items over its turns. Mostly serial by default, so RL has the
    parallel plans to find."""
    serial: float = field(default=0.6, metadata={"ge": 0, "le": 1})  # share of plans assigning one item a turn
    # share assigning every item in the first turn; the rest split the items over two turns
    parallel: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    create_subagent: float = field(default=0.2, metadata={"ge": 0, "le": 1})  # share first creating a named sub-agent
    subagent_episodes: float = field(default=0.5, metadata={"ge": 0, "lt": 1})  # share of demos that are sub-agents'

    def check(self) -> None:
        if self.serial + self.parallel > 1:
            raise ValueError(f"parallel: serial + parallel plans exceed all plans (got {self.parallel!r})")


@dataclass
class WarmStartConfig:
    """Supervised warm start of the demo model (see rl/demo/warm_start.py): on the addition task, or on
    demonstrated swarm episodes when the task is `wide_search` with the PARL swarm on.

    Trained to convergence with label smoothing, the policy's greedy answers are right while its
    sampled (temperature 1) answers are mostly wrong; RL has to concentrate the distribution.
    """
    label_smoothing: float = field(default=0.3, metadata={"ge": 0, "lt": 1})
    steps: int = field(default=1200, metadata={"ge": 0})  # with a cosine learning-rate decay to zero
    batch_size: int = 64
    lr: float = field(default=1e-3, metadata={"gt": 0})
    eval_prompts: int = 256
    swarm: SwarmDemoConfig = field(default_factory=SwarmDemoConfig)
