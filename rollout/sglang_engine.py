"""A rollout engine: one SGLang `Engine` generating K samples per prompt, token-in/token-out.

Prompts go in as token ids and responses come back as the exact sampled ids with SGLang's per-token
logprobs, so nothing is re-tokenised. Every sample is stamped with the engine's weight version.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from rl.sample import Sample
from rl.training_engine import resolve_device


class RolloutEngine:
    def __init__(self, model_path: str, device: str = "auto", tensor_parallel_size: int = 1,
                 max_total_tokens: int = 8192, mem_fraction_static: float = 0.3, dtype: str = "float32",
                 seed: int = 0, release_memory_during_train: bool = False):
        self.device = resolve_device(device)
        kwargs: dict = {}
        if self.device == "cpu":
            from rollout import sglang_cpu

            sglang_cpu.apply()
            kwargs.update(sglang_cpu.engine_kwargs(tensor_parallel_size))
        else:
            kwargs.update(mem_fraction_static=mem_fraction_static, enable_memory_saver=release_memory_during_train)
        import sglang

        self.engine = sglang.Engine(model_path=model_path, tp_size=tensor_parallel_size, dtype=dtype,
                                    max_total_tokens=max_total_tokens, random_seed=seed, log_level="error",
                                    **kwargs)
        self.tokenizer = self.engine.tokenizer_manager.tokenizer
        self.weight_version = 0
        self.can_release_memory = self.device != "cpu" and release_memory_during_train

    def generate(self, samples: list[Sample], max_new_tokens: int, temperature: float = 1.0) -> list[Sample]:
        """Fill in each sample's response ids, text, rollout logprobs, finish reason and weight version."""
        outputs = self.engine.generate(
            input_ids=[s.prompt_ids for s in samples],
            sampling_params={"temperature": temperature, "max_new_tokens": max_new_tokens},
            return_logprob=True,
        )
        for s, out in zip(samples, outputs):
            s.response_ids = list(out["output_ids"])
            s.rollout_logprobs = [lp for lp, _tok, _text in out["meta_info"]["output_token_logprobs"]]
            s.response = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
            s.finish_reason = out["meta_info"]["finish_reason"]["type"]
            s.weight_version = self.weight_version
        return samples

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        """Load full HF-named tensors into the engine and adopt `version` for later samples."""
        start = time.perf_counter()
        # SGLang 0.5.23 requires a weight-update session around tensor loads.
        self.engine.begin_weight_update()
        try:
            ok, message = self.engine.update_weights_from_tensor(list(named_tensors.items()), flush_cache=True)
        finally:
            self.engine.end_weight_update()
        if not ok:
            raise RuntimeError(f"SGLang weight update to version {version} failed: {message}")
        self.weight_version = version
        return {"load_seconds": time.perf_counter() - start}

    def release_memory(self) -> None:
        """Free weights and KV cache while the colocated trainer works (no-op on CPU)."""
        if self.can_release_memory:
            self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        if self.can_release_memory:
            self.engine.resume_memory_occupation()

    def generate_greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        outputs = self.engine.generate(input_ids=prompt_ids,
                                       sampling_params={"temperature": 0.0, "max_new_tokens": max_new_tokens})
        return [list(o["output_ids"]) for o in outputs]

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
