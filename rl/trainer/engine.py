"""The training engine: one rank of a Megatron-core `GPTModel` loaded from HF weights.

A rank holds its tensor- (TP), pipeline- (PP) and expert-parallel (EP) shard and one data-parallel
(DP) slice of every batch. It computes per-token logprobs of sampled responses and takes optimizer
steps on the Kimi objective with Megatron's own pipeline schedules, `DistributedDataParallel` and
parallel state. The same class runs in a Ray actor (the RL loop) or a plain process (multi-process
tests). On CPU it uses gloo and the accommodations in `rl.trainer.megatron_cpu`; on CUDA, NCCL, with no other
difference.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig

from checkpoint_engine.endpoint import Endpoint, engine_delivery
from rl.trainer.models import registry as architectures
from rl.algo.objectives import ObjectiveSettings, sample_losses, sample_weights
from rl.trainer.checkpoint import export_hf, load_checkpoint, save_checkpoint
from rl.trainer.micro_batches import MicroBatch, split_micro_batches
from rl.trainer.sharding import gather_full_state, is_expert, load_full_state, tensor_parallel_of
from rl.trainer.offload import Offloader
from rl.trainer.optim.muon import apply_qk_clip, build_optimizer, reset_max_attn_logits
from rl.trainer.parallel_layout import ParallelLayout, model_shape
from rl.trainer.weight_export import WeightExport
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
                 master_port: int = 29500, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 expert_parallel_size: int = 1, device: str = "auto", lr: float = 1e-3,
                 lr_warmup_steps: int = 0, lr_decay: str = "constant", lr_decay_steps: int = 0,
                 min_lr_ratio: float = 0.0, weight_decay: float = 0.0,
                 adam_betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0,
                 optimizer: str = "adamw", muon_momentum: float = 0.95, qk_clip_tau: Optional[float] = None,
                 micro_batch_tokens: int = 8192, vocab_pad_multiple: int = 1, seed: int = 0,
                 timeout_s: float = 300.0):
        from megatron.core import parallel_state

        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.layout = ParallelLayout(world_size, tensor_parallel_size, pipeline_parallel_size,
                                     expert_parallel_size).check(**model_shape(self.hf_config))
        self.device = resolve_device(device)
        self.grad_clip, self.micro_batch_tokens = grad_clip, micro_batch_tokens
        self.qk_clip_tau = qk_clip_tau  # MuonClip's tau (K2: 100); None: no QK-Clip
        if self.device == "cpu":
            from rl.trainer import megatron_cpu

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
                pipeline_model_parallel_size=pipeline_parallel_size,
                expert_model_parallel_size=expert_parallel_size,
                distributed_timeout_minutes=max(1, int(timeout_s // 60)))
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp, self.dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        torch.manual_seed(seed)
        if self.device != "cpu":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(seed)

        self.arch = architectures.for_config(self.hf_config)
        self._export: Optional[WeightExport] = None
        self._sync = Endpoint()
        self.vocab_size = self.hf_config.vocab_size
        multiple = vocab_pad_multiple * tensor_parallel_size
        self.padded_vocab = -(-self.vocab_size // multiple) * multiple
        self.model = self._build_model()
        self.ddp = self._wrap_ddp(self.model)
        self.load_hf_weights(load_hf_state_dict(model_path))
        self.optimizer = build_optimizer([self.model], optimizer, lr=lr, weight_decay=weight_decay,
                                         adam_betas=tuple(adam_betas), muon_momentum=muon_momentum)
        shape = dict(warmup=lr_warmup_steps, decay=lr_decay, total=lr_decay_steps, min_ratio=min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, **shape))
        self.model_path = model_path
        self.offloader = Offloader([self.ddp], self.optimizer)

    # --- state: offload, checkpoints, export ---------------------------------------------------------
    def offload(self) -> dict:
        """Move parameters, gradients and optimizer state to host memory (K2: while rollout runs)."""
        return dataclasses.asdict(self.offloader.offload())

    def onload(self) -> dict:
        """Bring them back to the device: one host-to-device copy per storage."""
        return dataclasses.asdict(self.offloader.onload())

    def save_checkpoint(self, path: str, extra: Optional[dict] = None) -> None:
        """Distributed save of model, optimizer, lr schedule and RNG (collective: every rank)."""
        save_checkpoint(path, [self.model], self.optimizer,
                        extra={**(extra or {}), "scheduler": self.scheduler.state_dict()})

    def load_checkpoint(self, path: str) -> dict:
        """Load a checkpoint saved under this or another parallel layout; returns the caller's extra state."""
        extra = load_checkpoint(path, [self.model], self.optimizer)
        self.scheduler.load_state_dict(extra.pop("scheduler"))
        return extra

    def export_hf(self, out_dir: str) -> None:
        """Write the current weights in HF `save_pretrained` layout (collective; rank 0 writes)."""
        state = self.hf_state_dict()
        if state is not None:
            export_hf(out_dir, state, self.model_path)

    # --- model -------------------------------------------------------------------------------------
    def _build_model(self):
        from megatron.core.models.gpt import GPTModel

        from rl.trainer.models.registry import gpt_model_kwargs

        hf, layout, arch = self.hf_config, self.layout, self.arch
        sequence_parallel = arch.needs_sequence_parallel and layout.tensor_parallel_size > 1
        cpu_overrides = {}
        if self.device == "cpu":
            from rl.trainer import megatron_cpu

            cpu_overrides = megatron_cpu.CONFIG_OVERRIDES
            if sequence_parallel:
                megatron_cpu.use_cpu_rng_tracker()  # the embedding forks it under sequence parallelism
        config = arch.config_class(hf)(
            **arch.transformer_config_kwargs(hf),
            tensor_model_parallel_size=layout.tensor_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_parallel_size,
            expert_model_parallel_size=layout.expert_parallel_size,
            sequence_parallel=sequence_parallel, pipeline_dtype=torch.float32,
            hidden_dropout=0.0, attention_dropout=0.0,
            # Initialisation is overwritten by the HF weights, but it is also where Megatron marks
            # parameters `tensor_model_parallel` / `partition_dim`, which sharding and clipping read.
            use_cpu_initialization=self.device == "cpu", perform_initialization=True,
            params_dtype=torch.float32, bias_activation_fusion=False, bias_dropout_fusion=False,
            masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
            qk_clip=self.qk_clip_tau is not None, qk_clip_threshold=self.qk_clip_tau or 100.0,
            **cpu_overrides,
        )
        model = GPTModel(config=config, transformer_layer_spec=arch.layer_spec(hf, self.device, config),
                         **gpt_model_kwargs(hf, self.padded_vocab, self.first_stage, self.last_stage))
        return model.to(self.device)

    def _wrap_ddp(self, model):
        """Megatron's DDP: gradients accumulate in fp32 `main_grad` buffers and are averaged over DP
        (and, for tied embeddings under PP, summed between the first and last stage) at the end."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        ddp = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=False))
        model.config.finalize_model_grads_func = finalize_model_grads
        return ddp

    def load_hf_weights(self, hf_state: dict[str, torch.Tensor]) -> None:
        load_full_state(self.model, self.arch.hf_to_full(hf_state, self.hf_config), self.padded_vocab)

    def hf_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full HF-named CPU tensors on global rank 0 (gathered over TP, PP and EP); None elsewhere.

        Collective: every rank must call it.
        """
        full = gather_full_state(self.model, self.vocab_size)
        return None if full is None else self.arch.full_to_hf(full, self.hf_config)

    def hf_grad_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The gradients of the last `compute_gradients`, HF-named and full-shape, on global rank 0."""
        full = gather_full_state(self.model, self.vocab_size, grads=True)
        return None if full is None else self.arch.full_to_hf(full, self.hf_config)

    def reset_optimizer_state(self) -> None:
        """Forget Adam's moments (K1.5 resets the optimizer every iteration); the lr schedule goes on."""
        self.optimizer.state.clear()

    # --- compute -----------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [batch, seq, padded vocab / TP] (single pipeline stage only)."""
        if self.layout.pipeline_parallel_size > 1:
            raise RuntimeError("logits() needs the whole model on one rank; use compute_logprobs under PP")
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        return self.model(input_ids=input_ids, position_ids=positions, attention_mask=None)

    def _token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Logprob of each next token, [batch, seq - 1], from vocab-parallel logits / each row's temperature.

        Rows of the padded vocabulary get -inf, so the softmax is over the real vocabulary only.
        """
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits[:, :-1] / temperature.to(logits.device, logits.dtype)[:, None, None]
        if self.padded_vocab != self.vocab_size:
            start = self.tp_rank * logits.shape[-1]
            ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
            logits = logits.masked_fill(ids >= self.vocab_size, float("-inf"))
        targets = tokens[:, 1:].to(logits.device)
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous())
        return -nll.transpose(0, 1)

    def _run_schedule(self, batches: list[MicroBatch], loss_func, forward_only: bool) -> list[dict]:
        """Megatron's forward(-backward) schedule (1F1B under PP) over this rank's micro-batches."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            tokens = batch.tokens.to(self.device)
            positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
            output = model(input_ids=tokens, position_ids=positions, attention_mask=None)
            return output, partial(loss_func, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches), forward_only=forward_only)

    def _split(self, samples: list[Sample], weights: Optional[torch.Tensor] = None) -> list[MicroBatch]:
        return split_micro_batches(samples, weights, self.dp, self.dp_rank, self.micro_batch_tokens,
                                   width_multiple=self.layout.tensor_parallel_size, uniform=self.layout.pipeline_parallel_size > 1)

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample]) -> list[list[float]]:
        """Per-response-token logprobs of each sample under the current weights, at the sample's
        sampling temperature (on every rank)."""
        self.ddp.eval()
        batches = self._split(samples)

        def collect(batch: MicroBatch, logits):
            logprobs = self._token_logprobs(logits, batch.tokens, batch.temperature).cpu()
            return logits.new_zeros(()), {"index": batch.index, "logprobs": logprobs}

        found: dict[int, list[float]] = {}
        for out in self._run_schedule(batches, collect, forward_only=True):
            for row, i in enumerate(out["index"].tolist()):
                if i >= 0:
                    s = samples[i]
                    found[i] = out["logprobs"][row, len(s.prompt_ids) - 1 : len(s.tokens) - 1].tolist()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found if (self.last_stage and self.tp_rank == 0) else {})
        for part in everyone:
            found.update(part)
        return [found[i] for i in range(len(samples))]

    def compute_gradients(self, samples: list[Sample], objective: ObjectiveSettings,
                          ptx_coef: float = 0.0) -> dict[str, float]:
        """Forward and backward over `samples` (one minibatch): DP-reduced grads in `main_grad`.

        Rollouts get the objective, PTX demonstrations (`Sample.ptx`) `ptx_coef` times their token-mean
        NLL. Returns both values ("loss", "ptx_loss": the NLL without the coefficient). The loss of
        each micro-batch is its samples' weighted terms; Megatron divides by the number of
        micro-batches and DDP averages over DP, which we undo, so the gradient is exactly that of the
        whole minibatch's loss whatever the layout.
        """
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        weights = torch.zeros(len(samples))
        rl = [i for i, s in enumerate(samples) if not s.ptx]
        ptx = [i for i, s in enumerate(samples) if s.ptx]
        if rl:
            weights[rl] = sample_weights([samples[i].group_id for i in rl], [samples[i].trained_tokens for i in rl],
                                         objective.aggregation)
        if ptx:  # token mean over the demonstrations' response tokens
            weights[ptx] = 1.0 / sum(len(samples[i].response_ids) for i in ptx)
        batches = self._split(samples, weights)
        undo = len(batches) * self.dp

        def loss_func(batch: MicroBatch, logits):
            logprobs = self._token_logprobs(logits, batch.tokens, batch.temperature)
            on = lambda t: t.to(logprobs.device)  # noqa: E731
            mask, is_ptx, w = on(batch.loss_mask), on(batch.ptx), on(batch.weights)
            terms = sample_losses(objective, logprobs, on(batch.old_logprobs), on(batch.rollout_logprobs),
                                  on(batch.advantages), mask)
            nll = -(logprobs * mask).sum(-1)
            rl_loss = (w * torch.where(is_ptx > 0, 0.0, terms)).sum()
            ptx_loss = (w * torch.where(is_ptx > 0, nll, 0.0)).sum()
            return (rl_loss + ptx_coef * ptx_loss) * undo, {"loss": rl_loss.detach(), "ptx_loss": ptx_loss.detach()}

        outputs = self._run_schedule(batches, loss_func, forward_only=False)
        totals = torch.zeros(2, device=self.device)
        if self.last_stage and self.tp_rank == 0:
            for out in outputs:
                totals += torch.stack([out["loss"], out["ptx_loss"]])
        dist.all_reduce(totals)
        return {"loss": totals[0].item(), "ptx_loss": totals[1].item()}

    def train_step(self, samples: list[Sample], objective: ObjectiveSettings = ObjectiveSettings(),
                   num_minibatches: int = 1, ptx: Sequence[Sample] = (), ptx_coef: float = 0.0) -> dict[str, float]:
        """One RL iteration: `num_minibatches` optimizer steps over the samples, split by prompt group;
        the PTX demonstrations `ptx` are dealt to the minibatches in turn."""
        start = time.perf_counter()
        group_ids = sorted({s.group_id for s in samples})
        chunks = [set(group_ids[i::num_minibatches]) for i in range(num_minibatches)]
        results, norms, max_logits = [], [], []
        for n, chunk in enumerate(chunks):
            reset_max_attn_logits([self.model])  # logits seen by logprob/eval passes do not count
            minibatch = [s for s in samples if s.group_id in chunk] + list(ptx[n::num_minibatches])
            results.append(self.compute_gradients(minibatch, objective, ptx_coef))
            norms.append(self._clip_grad_norm())
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            for p in self.model.parameters():
                p.grad = p.main_grad
            self.optimizer.step()
            for p in self.model.parameters():
                p.grad = None  # else the next backward adds into main_grad through p.grad as well
            self.scheduler.step()
            if self.qk_clip_tau is not None:
                max_logits.append(self._apply_qk_clip())
        metrics = {"loss": sum(r["loss"] for r in results) / len(results), "grad_norm": max(norms), "lr": lr,
                   "train_seconds": time.perf_counter() - start}
        if ptx:
            metrics["ptx_loss"] = sum(r["ptx_loss"] for r in results) / len(results)
        if max_logits:
            metrics["max_attn_logit"] = max(max_logits)
        return metrics

    def _apply_qk_clip(self) -> float:
        """MuonClip's QK-Clip after the step; returns the largest attention logit over the model."""
        from megatron.core import parallel_state as ps

        local = torch.tensor(apply_qk_clip([self.model]), device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ps.get_model_parallel_group())
        return local.item()

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients in `main_grad`, over every distinct parameter.

        A parameter counts once: TP-replicated ones on TP rank 0 only, the last stage's copy of tied
        embeddings not at all. Dense squares are summed over TP x PP, expert ones over ETP x EP x PP.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.module import param_is_not_shared

        dense = torch.zeros((), device=self.device)
        expert = torch.zeros((), device=self.device)
        for name, p in self.model.named_parameters():
            if not param_is_not_shared(p):
                continue
            tp_rank, _, _ = tensor_parallel_of(name)
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq = p.main_grad.float().pow(2).sum()
                if is_expert(name):
                    expert += sq
                else:
                    dense += sq
        dist.all_reduce(dense, group=ps.get_model_parallel_group())
        dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return (dense + expert).sqrt().item()

    def _clip_grad_norm(self) -> float:
        norm = self.grad_norm()
        scale = self.grad_clip / (norm + 1e-6)
        if scale < 1.0:
            for p in self.model.parameters():
                p.main_grad.mul_(scale)
        return norm

    # --- weight sync: this rank as a checkpoint-engine source --------------------------------------
    def weight_sync_provided(self, placed: bool) -> list:
        """The HF tensors (TensorMeta) this rank contributes to a push; see rl/trainer/weight_export.py."""
        if self._export is None:
            self._export = WeightExport(self.model, self.arch, self.hf_config, self.vocab_size)
        return self._export.provided(placed)

    def weight_sync_setup(self, rollouts: Optional[list] = None, **endpoint_args) -> int:
        """Join the sync group; in colocated mode, `rollouts` are the engines this rank delivers to."""
        self._sync_placed = endpoint_args["mode"] == "reduce_scatter"
        self._sync_deliver = engine_delivery(rollouts, endpoint_args["timeout_s"]) if rollouts else None
        return self._sync.setup(**endpoint_args)

    def weight_sync_push(self, version: int) -> dict:
        produce = lambda bucket: self._export.produce(bucket.names(), self._sync_placed)  # noqa: E731
        return self._sync.push(version, produce=produce, deliver=self._sync_deliver)

    def weight_sync_teardown(self) -> None:
        self._sync.teardown()

    def shutdown(self) -> None:
        from megatron.core import parallel_state

        self._sync.teardown()

        parallel_state.destroy_model_parallel()
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
