"""Building a trainer rank's model: Megatron-core's `GPTModel` for the architecture, this rank's shard of
it, wrapped in Megatron's DistributedDataParallel."""
from __future__ import annotations

from typing import Optional

import torch

from rl.trainer.parallel_layout import ParallelLayout


def build_model(hf_config, arch, layout: ParallelLayout, device: str, padded_vocab: int,
                qk_clip_tau: Optional[float], first_stage: bool, last_stage: bool):
    """This rank's `GPTModel` (its TP/PP/EP shard), randomly initialised on `device`."""
    from megatron.core.models.gpt import GPTModel

    from rl.trainer.models.registry import gpt_model_kwargs

    sequence_parallel = arch.needs_sequence_parallel and layout.tensor_parallel_size > 1
    cpu_overrides = {}
    if device == "cpu":
        from rl.trainer import megatron_cpu

        cpu_overrides = megatron_cpu.CONFIG_OVERRIDES
        if sequence_parallel:
            megatron_cpu.use_cpu_rng_tracker()  # the embedding forks it under sequence parallelism
    config = arch.config_class(hf_config)(
        **arch.transformer_config_kwargs(hf_config),
        tensor_model_parallel_size=layout.tensor_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_parallel_size,
        expert_model_parallel_size=layout.expert_parallel_size,
        sequence_parallel=sequence_parallel, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0,
        # Initialisation is overwritten by the HF weights, but it is also where Megatron marks
        # parameters `tensor_model_parallel` / `partition_dim`, which sharding and clipping read.
        use_cpu_initialization=device == "cpu", perform_initialization=True,
        params_dtype=torch.float32, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        qk_clip=qk_clip_tau is not None, qk_clip_threshold=qk_clip_tau or 100.0,
        moe_enable_routing_replay=True,  # MoE routers call a RouterReplay (rl/trainer/routing.py); dense: unused
        cuda_graph_scope=[],  # the whole layer, as Megatron's default "full" (which warns it is deprecated)
        **cpu_overrides,
    )
    model = GPTModel(config=config, transformer_layer_spec=arch.layer_spec(hf_config, device, config),
                     **gpt_model_kwargs(hf_config, padded_vocab, first_stage, last_stage))
    return model.to(device)


def wrap_ddp(model):
    """Megatron's DDP: gradients accumulate in fp32 `main_grad` buffers and are averaged over DP
    (and, for tied embeddings under PP, summed between the first and last stage) at the end."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False))
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp
