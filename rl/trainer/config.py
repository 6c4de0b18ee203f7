"""The Megatron trainer's settings (`trainer`): parallel layout, optimizer and schedule. The trainer is
built from this object (rl/trainer/engine.py); bounds sit in each field's metadata, checked by
rl/config.py before any actor starts, which also checks the layout against the model's shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rl.trainer.parallel_layout import ParallelLayout


@dataclass
class TrainerConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1  # carved out of the data-parallel ranks: must divide DP
    world_size: Optional[int] = None  # training processes (one per GPU); None: TP * PP, i.e. DP = 1
    # padded tokens (rows x width) per micro-batch and DP rank; None: 8192 on CUDA, and on CPU
    # megatron_cpu.MICRO_BATCH_TOKENS (smaller micro-batches train faster there: docs/performance.md)
    micro_batch_tokens: Optional[int] = field(default=None, metadata={"ge": 1})
    # pad the vocabulary to a multiple of this x TP (Megatron-LM uses 128)
    vocab_pad_multiple: int = field(default=1, metadata={"ge": 1})
    # adamw | muon (Muon on hidden matrices, AdamW on the rest; Kimi K2)
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "muon")})
    muon_momentum: float = field(default=0.95, metadata={"ge": 0, "lt": 1})
    # MuonClip's QK-Clip threshold (K2: 100); None: off
    qk_clip_tau: Optional[float] = field(default=None, metadata={"gt": 0})
    lr: float = field(default=5e-4, metadata={"gt": 0})
    # linear warm-up: Adam's first steps are sign-like and wreck a fine-tuned policy
    lr_warmup_steps: int = field(default=10, metadata={"ge": 0})
    # constant | cosine (from lr after warm-up to lr * min_lr_ratio at the last step)
    lr_decay: str = field(default="cosine", metadata={"choices": ("constant", "cosine")})
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = field(default=1.0, metadata={"gt": 0})
    seed: int = 0
    timeout_s: float = field(default=300.0, metadata={"gt": 0})  # every remote call to an engine is bounded by this

    def check(self) -> None:
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: must be in [0, 1) (got {self.adam_betas!r})")

    def layout(self) -> ParallelLayout:
        """The trainer ranks' layout; `world_size` None means one data-parallel replica."""
        world = self.world_size if self.world_size is not None else self.tensor_parallel_size * self.pipeline_parallel_size
        return ParallelLayout(world, self.tensor_parallel_size, self.pipeline_parallel_size, self.expert_parallel_size)
