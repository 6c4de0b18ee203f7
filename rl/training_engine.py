"""The training engine: one tensor-parallel rank of a Megatron-core `GPTModel` loaded from HF weights.

It computes per-token logprobs of sampled responses and takes optimizer steps on the Kimi objective.
The same class runs in a Ray actor (the RL loop) or in a plain process (multi-process tests).
On CPU it uses gloo and the accommodations in `rl.megatron_cpu`; on CUDA, NCCL and Megatron's own
modules, with no other difference.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig

from rl.algorithms import kimi_k2_loss
from rl.hf_megatron import Geometry, hf_to_megatron, megatron_to_hf
from rl.sample import Sample


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


class TrainingEngine:
    def __init__(self, model_path: str, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, tensor_parallel_size: int = 1, device: str = "auto",
                 lr: float = 1e-3, lr_warmup_steps: int = 0, lr_decay: str = "constant",
                 lr_decay_steps: int = 0, min_lr_ratio: float = 0.0, weight_decay: float = 0.0,
                 adam_betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0, seed: int = 0,
                 timeout_s: float = 300.0):
        from megatron.core import parallel_state

        self.device = resolve_device(device)
        self.rank, self.tp = rank, tensor_parallel_size
        self.grad_clip = grad_clip
        if self.device == "cpu":
            from rl import megatron_cpu

            megatron_cpu.patch_current_device()
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) if world_size > 1 else 0)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="gloo" if self.device == "cpu" else "nccl",
                init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s))
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tensor_parallel_size,
                distributed_timeout_minutes=max(1, int(timeout_s // 60)))
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        torch.manual_seed(seed)

        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.geometry = Geometry.from_hf(self.hf_config)
        if self.hf_config.vocab_size % tensor_parallel_size:
            raise ValueError(f"vocab size {self.hf_config.vocab_size} is not divisible by TP={tensor_parallel_size}")
        self.model = self._build_model()
        self.load_hf_weights(load_hf_state_dict(model_path))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay,
                                           betas=tuple(adam_betas))
        shape = dict(warmup=lr_warmup_steps, decay=lr_decay, total=lr_decay_steps, min_ratio=min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, **shape))

    # --- model -------------------------------------------------------------------------------------
    def _build_model(self):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer import TransformerConfig

        hf, g = self.hf_config, self.geometry
        config = TransformerConfig(
            num_layers=g.num_layers, hidden_size=hf.hidden_size, num_attention_heads=g.num_heads,
            num_query_groups=g.num_kv_heads, kv_channels=g.head_dim, ffn_hidden_size=hf.intermediate_size,
            normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, add_qkv_bias=g.qkv_bias,
            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=self.tp,
            use_cpu_initialization=self.device == "cpu", perform_initialization=False,
            params_dtype=torch.float32, bias_activation_fusion=False, bias_dropout_fusion=False,
            masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        )
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if self.device == "cpu":
            from rl.megatron_cpu import cpu_layer_spec

            spec = cpu_layer_spec(spec)
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=hf.vocab_size,
            max_sequence_length=hf.max_position_embeddings, pre_process=True, post_process=True,
            share_embeddings_and_output_weights=g.tied_embeddings, position_embedding_type="rope",
            rotary_base=int(getattr(hf, "rope_theta", 10000)), parallel_output=True,
        )
        return model.to(self.device)

    def load_hf_weights(self, hf_state: dict[str, torch.Tensor]) -> None:
        shard = hf_to_megatron(hf_state, self.geometry, self.tp_rank, self.tp)
        missing, unexpected = self.model.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"HF -> Megatron load mismatch: missing={missing} unexpected={unexpected}")

    def hf_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full HF-named CPU tensors on TP rank 0 (gathered from all TP ranks); None on other ranks."""
        local = {k: v.detach() for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        if self.tp == 1:
            shards = [local]
        else:
            shards = [{} for _ in range(self.tp)]
            for name, tensor in local.items():
                parts = [torch.empty_like(tensor) for _ in range(self.tp)]
                dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
                for r in range(self.tp):
                    shards[r][name] = parts[r]
        if self.tp_rank != 0:
            return None
        return {k: v.cpu() for k, v in megatron_to_hf(shards, self.geometry).items()}

    def reset_optimizer_state(self) -> None:
        """Forget Adam's moments (K1.5 resets the optimizer every iteration); the lr schedule goes on."""
        self.optimizer.state.clear()

    # --- compute -----------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [batch, seq, vocab / TP] for right-padded `input_ids`."""
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        return self.model(input_ids=input_ids, position_ids=positions, attention_mask=None)

    def _token_logprobs(self, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Logprob of each next token: [batch, seq - 1], under logits / temperature."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = self.logits(input_ids)[:, :-1] / temperature
        targets = input_ids[:, 1:].to(self.device)
        # Megatron's vocab-parallel cross entropy is the exact -log softmax across TP ranks.
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous())
        return -nll.transpose(0, 1)

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], temperature: float = 1.0) -> list[list[float]]:
        """Per-response-token logprobs of each sample under the current weights."""
        self.model.eval()
        batch = _pad(samples)
        logprobs = self._token_logprobs(batch["tokens"], temperature).cpu()
        return [logprobs[i, len(s.prompt_ids) - 1 : len(s.tokens) - 1].tolist() for i, s in enumerate(samples)]

    def train_step(self, samples: list[Sample], tau: float, temperature: float = 1.0,
                   num_minibatches: int = 1) -> dict[str, float]:
        """One RL iteration: `num_minibatches` optimizer steps over the samples, split by prompt group."""
        start = time.perf_counter()
        self.model.train()
        group_ids = sorted({s.group_id for s in samples})
        chunks = [set(group_ids[i::num_minibatches]) for i in range(num_minibatches)]
        losses, norms = [], []
        for chunk in chunks:
            part = [s for s in samples if s.group_id in chunk]
            batch = _pad(part)
            logprobs = self._token_logprobs(batch["tokens"], temperature)
            loss = kimi_k2_loss(
                logprobs, batch["old_logprobs"].to(self.device), batch["advantages"].to(self.device),
                batch["loss_mask"].to(self.device), batch["group_ids"].to(self.device), tau)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(self._clip_grad_norm())
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses), "grad_norm": max(norms), "lr": lr,
                "train_seconds": time.perf_counter() - start}

    def _clip_grad_norm(self) -> float:
        """Clip by the global gradient norm: TP-sharded parameters are summed over ranks, replicated ones once."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        params = [p for p in self.model.parameters() if p.grad is not None]
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for p in params:
            if param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.float().pow(2).sum()
        if self.tp > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = sq.sqrt().item()
        scale = self.grad_clip / (norm + 1e-6)
        if scale < 1.0:
            for p in params:
                p.grad.mul_(scale)
        return norm

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def lr_factor(step: int, warmup: int, decay: str, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then constant or cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _pad(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a list of samples; per-token fields are aligned to next-token targets."""
    width = max(len(s.tokens) for s in samples)
    n = len(samples)
    tokens = torch.zeros(n, width, dtype=torch.long)
    loss_mask = torch.zeros(n, width - 1)
    old = torch.zeros(n, width - 1)
    for i, s in enumerate(samples):
        tokens[i, : len(s.tokens)] = torch.tensor(s.tokens)
        start, end = len(s.prompt_ids) - 1, len(s.tokens) - 1
        loss_mask[i, start:end] = 1.0
        if s.old_logprobs:
            old[i, start:end] = torch.tensor(s.old_logprobs)
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "old_logprobs": old,
        "advantages": torch.tensor([s.advantage or 0.0 for s in samples]),
        "group_ids": torch.tensor([s.group_id for s in samples]),
    }
