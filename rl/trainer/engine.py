"""The training engine: one rank of a Megatron-core `GPTModel` loaded from HF weights.

A rank holds its tensor- (TP), pipeline- (PP) and expert-parallel (EP) shard and one data-parallel
(DP) slice of every batch. It computes per-token logprobs of sampled responses and takes optimizer
steps on the policy objective with Megatron's own pipeline schedules, `DistributedDataParallel` and
parallel state. The same class runs in a Ray actor (the RL loop) or a plain process (multi-process
tests). On CPU it uses gloo and the accommodations in `rl.trainer.megatron_cpu`; on CUDA, NCCL, with
no other difference.

This class is the rank's facade; the work is done in its neighbours: setting up (setup.py), building
the model (build.py), computing (compute.py), optimizers (optim/), checkpoints and HF export
(checkpoint.py), offload (offload.py) and the weight push's source side (weight_export.py).
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from transformers import AutoConfig

from checkpoint_engine.endpoint import Endpoint, engine_delivery
from checkpoint_engine.group import node_address
from checkpoint_engine.transports import transport
from rl.algo.mismatch import mismatch_metrics
from rl.algo.objectives import ObjectiveSettings
from rl.sample import Sample
from rl.trainer import compute, routing
from rl.trainer.build import build_model, wrap_ddp
from rl.trainer.checkpoint import load_checkpoint, save_checkpoint
from rl.trainer.config import TrainerConfig
from rl.trainer.export import export_hf
from rl.trainer.micro_batches import carries_old
from rl.trainer.models import registry as architectures
from rl.trainer.offload import Offloader
from rl.trainer.optim.muon import build_optimizer
from rl.trainer.optim.qk_clip import apply_qk_clip, reset_max_attn_logits
from rl.trainer.parallel_layout import model_shape
from rl.trainer.response_logits import ResponseLogits
from rl.trainer.setup import init_distributed, load_hf_state_dict, lr_factor, resolve_device
from rl.trainer.sharding import gather_full_state, load_full_state
from rl.trainer.weight_export import WeightExport

MICRO_BATCH_TOKENS = 8192  # per micro-batch and DP rank when trainer.micro_batch_tokens is None (CUDA)


class TrainingEngine:
    def __init__(self, model_path: str, config: Optional[TrainerConfig] = None, rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, device: str = "auto",
                 lr_decay_steps: int = 0, seed: Optional[int] = None, threads: Optional[int] = None):
        """One trainer rank of `config`'s layout (rank `rank`, rendezvous at master_addr:master_port);
        the cosine decay spans `lr_decay_steps` optimizer steps; `seed` defaults to config.seed;
        `threads`: torch's intra-op threads (None: as the process has them; in a Ray actor that is
        its num_cpus, which rl/cluster.py's Placement.threads overrides)."""
        from megatron.core import parallel_state

        if threads is not None:
            torch.set_num_threads(threads)

        self.config = config = config or TrainerConfig()
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.layout = config.layout().check(**model_shape(self.hf_config))
        self.device = resolve_device(device)
        init_distributed(self.layout, rank, master_addr, master_port, self.device, config.timeout_s,
                         config.seed if seed is None else seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp, self.dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()

        self.arch = architectures.for_config(self.hf_config)
        self._export: Optional[WeightExport] = None
        self._sync = Endpoint()
        self.vocab_size = self.hf_config.vocab_size
        self.micro_batch_tokens = config.micro_batch_tokens or MICRO_BATCH_TOKENS
        if self.device == "cpu" and config.micro_batch_tokens is None:
            from rl.trainer import megatron_cpu

            self.micro_batch_tokens = megatron_cpu.MICRO_BATCH_TOKENS
        multiple = config.vocab_pad_multiple * self.layout.tensor_parallel_size
        self.padded_vocab = -(-self.vocab_size // multiple) * multiple
        self.model = build_model(self.hf_config, self.arch, self.layout, self.device, self.padded_vocab,
                                 config.qk_clip_tau, self.first_stage, self.last_stage)
        self.ddp = wrap_ddp(self.model)
        self.moe = getattr(self.model.config, "num_moe_experts", None) is not None
        self.routers = routing.install(self.model)  # MoE: replay and record per layer (rl/trainer/routing.py)
        self.recorded_routing: Optional[list] = None
        # the output layer's logits only where responses are predicted (rl/trainer/response_logits.py)
        self.response_logits = ResponseLogits(self.model, trims=not self.model.config.sequence_parallel
                                              ) if self.last_stage else None
        self.load_hf_weights(load_hf_state_dict(model_path))
        self.optimizer = build_optimizer([self.model], config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                         adam_betas=tuple(config.adam_betas), muon_momentum=config.muon_momentum)
        shape = dict(warmup=config.lr_warmup_steps, decay=config.lr_decay, total=lr_decay_steps,
                     min_ratio=config.min_lr_ratio)
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

    # --- compute (rl/trainer/compute.py) ----------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [batch, seq, padded vocab / TP] (single pipeline stage only)."""
        if self.layout.pipeline_parallel_size > 1:
            raise RuntimeError("logits() needs the whole model on one rank; use compute_logprobs under PP")
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        return self.model(input_ids=input_ids, position_ids=positions, attention_mask=None)

    def compute_logprobs(self, samples: list[Sample], record_routing: bool = False,
                         replay: Optional[list] = None) -> list[list[float]]:
        """Per-response-token logprobs of each sample under the current weights, at the sample's
        sampling temperature (on every rank); MoE: replaying and recording routing (see compute.py)."""
        return compute.compute_logprobs(self, samples, record_routing, replay)

    def compute_gradients(self, samples: list[Sample], objective: ObjectiveSettings,
                          ptx_coef: float = 0.0, version: Optional[int] = None,
                          replay: Optional[list] = None) -> dict[str, float]:
        """Forward and backward over one minibatch: DP-reduced grads in `main_grad` (see compute.py)."""
        return compute.compute_gradients(self, samples, objective, ptx_coef, version, replay)

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients in `main_grad`, over every distinct parameter."""
        return compute.grad_norm(self)

    def train_step(self, samples: list[Sample], objective: ObjectiveSettings = ObjectiveSettings(),
                   num_minibatches: int = 1, ptx: Sequence[Sample] = (), ptx_coef: float = 0.0,
                   version: Optional[int] = None) -> dict[str, float]:
        """One RL iteration: `num_minibatches` optimizer steps over the samples, split by prompt group;
        the PTX demonstrations `ptx` are dealt to the minibatches in turn.

        pi_old, for samples that do not carry it: the first minibatch's training forward gives it (the
        weights have not moved yet); the later minibatches' come from one no-grad pass before the first
        update. With one update a step (the default) there is no separate pass at all; with
        `routing_replay: trainer` (R2) that pass's MoE routing is replayed in the later minibatches' updates.
        `version`: the weights being trained, whose sampled tokens the mismatch metrics cover
        (rl/algo/mismatch.py)."""
        start = time.perf_counter()
        group_ids = sorted({s.group_id for s in samples})
        chunks = [set(group_ids[i::num_minibatches]) for i in range(num_minibatches)]
        minibatches = [[s for s in samples if s.group_id in chunk] + list(ptx[n::num_minibatches])
                       for n, chunk in enumerate(chunks)]
        later = [s for minibatch in minibatches[1:] for s in minibatch if not carries_old(s)]
        r2 = objective.routing_replay == "trainer"
        recorded: dict[int, object] = {}
        if later:
            r3 = [s.routed_experts for s in later] if objective.routing_replay == "rollout" else None
            with_old = {id(s): dataclasses.replace(s, old_logprobs=lp)  # pi_old replays R3's routing too
                        for s, lp in zip(later, self.compute_logprobs(later, record_routing=r2, replay=r3))}
            recorded = {id(with_old[id(s)]): r for s, r in zip(later, self.recorded_routing or [])}
            minibatches = [minibatches[0]] + [[with_old.get(id(s), s) for s in mb] for mb in minibatches[1:]]
        results, norms, max_logits = [], [], []
        for minibatch in minibatches:
            reset_max_attn_logits([self.model])  # logits seen by logprob/eval passes do not count
            replay = [recorded.get(id(s)) for s in minibatch] if recorded else None
            results.append(self.compute_gradients(minibatch, objective, ptx_coef, version, replay))
            norms.append(self._clip_grad_norm())
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            for p in self.model.parameters():
                p.grad = p.main_grad
            self.optimizer.step()
            for p in self.model.parameters():
                p.grad = None  # else the next backward adds into main_grad through p.grad as well
            self.scheduler.step()
            if self.config.qk_clip_tau is not None:  # MuonClip's QK-Clip (K2: tau 100)
                max_logits.append(self._apply_qk_clip())
        metrics = {"loss": sum(r["loss"] for r in results) / len(results), "grad_norm": max(norms), "lr": lr,
                   "train_seconds": time.perf_counter() - start}
        if version is not None:
            sums = {k: sum(r["sums"][k] for r in results) for k in results[0]["sums"]}
            sums["abs_max"] = max(r["sums"]["abs_max"] for r in results)
            metrics.update(mismatch_metrics(sums))
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

    def _clip_grad_norm(self) -> float:
        norm = self.grad_norm()
        scale = self.config.grad_clip / (norm + 1e-6)
        if scale < 1.0:
            for p in self.model.parameters():
                p.main_grad.mul_(scale)
        return norm

    # --- weight sync: this rank as a checkpoint-engine source --------------------------------------
    def rendezvous_point(self) -> tuple[str, int]:
        """This rank's node address and a port free on that node: where the sync group meets when this
        is rank 0 (its TCP store), reachable from every node."""
        return node_address()

    def weight_sync_provided(self, placed: bool) -> list:
        """The HF tensors (TensorMeta) this rank contributes to a push; see rl/trainer/weight_export.py."""
        if self._export is None:
            self._export = WeightExport(self.model, self.arch, self.hf_config, self.vocab_size)
        return self._export.provided(placed)

    def weight_sync_setup(self, rollouts: Optional[list] = None, **endpoint_args) -> int:
        """Join the sync group; in colocated mode, `rollouts` are the engines this rank delivers to."""
        self._sync_placed = transport(endpoint_args["mode"]).placed
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
