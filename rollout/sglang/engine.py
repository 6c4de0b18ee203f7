"""A rollout engine: one SGLang `Engine` generating K samples per prompt, token-in/token-out.

Prompts go in as token ids and responses come back as the exact sampled ids with SGLang's per-token
logprobs, so nothing is re-tokenised. Every sample is stamped with the engine's weight version.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Optional, Union

import torch

from rl.sample import Sample
from rollout.config import RolloutConfig
from rollout.sglang import loader as sglang_loader
from rollout.sglang.rendezvous import schedulers_meet_on_loopback
from rollout.sglang.routing import decode_routed_experts, merge_segment_routing, routed_experts_shape

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export_repo_to_workers() -> None:
    """SGLang's worker processes import our weight loaders by module path: put the repo on their path."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, REPO_ROOT])


def prefill_shared_prompts(engine, prompts: list[list[int]]) -> None:
    """Prefill every prompt that appears more than once in `prompts`, once (no token generated), on the
    SGLang `engine`, so that their generation finds it in the prefix cache: with SGLang's default
    first-come scheduling the K copies of a prompt arriving together would each prefill it."""
    counts = Counter(tuple(ids) for ids in prompts)
    shared = [list(ids) for ids, n in counts.items() if n > 1]
    if shared:
        engine.generate(input_ids=shared, sampling_params={"max_new_tokens": 0})


class RolloutEngine:
    def __init__(self, model_path: str, config: Optional[RolloutConfig] = None, device: str = "auto", seed: int = 0,
                 gpu_ids: Optional[list[str]] = None, threads: Optional[int] = None):
        """An SGLang engine of `config`'s tensor-parallel size, KV-cache cap and memory settings. `gpu_ids`:
        the GPUs of the engine's placement-group bundles; its worker processes see exactly these (Ray
        gives the actor only the GPU of the bundle it sits in). `threads`: torch threads of each of its
        scheduler processes (None: inherited; in a Ray actor OMP_NUM_THREADS is its num_cpus)."""
        config = config or RolloutConfig()
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)  # inherited by SGLang's workers
        if threads is not None:  # SGLang's schedulers read it at start (on CPU they set no threads themselves)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        tensor_parallel_size, release_memory_during_train = config.tensor_parallel_size, config.release_memory_during_train
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict = {}
        self.seeded_requests = config.deterministic_sampling  # rl/config.py allows it on CUDA only
        loaders = list(sglang_loader.LOADERS)
        if self.device == "cpu":
            from rollout.sglang import cpu as sglang_cpu

            sglang_cpu.apply()
            kwargs.update(sglang_cpu.engine_kwargs(tensor_parallel_size))
            loaders += sglang_cpu.LOADERS
        else:
            kwargs.update(mem_fraction_static=config.mem_fraction_static, enable_memory_saver=release_memory_during_train,
                          enable_deterministic_inference=config.deterministic_sampling, base_gpu_id=0)
        _export_repo_to_workers()
        import sglang

        with schedulers_meet_on_loopback() as store:  # single-node: no listener beyond loopback
            self.engine = sglang.Engine(model_path=model_path, tp_size=tensor_parallel_size, dtype=config.dtype,
                                        max_total_tokens=config.max_total_tokens, random_seed=seed, log_level="error",
                                        sleep_on_idle=config.sleep_on_idle, enable_return_routed_experts=config.return_routing,
                                        custom_weight_loader=loaders, **kwargs)
        self.rendezvous_store = store  # the schedulers' process group keeps using it
        # CPU: objects each scheduler process keeps from start-up, now out of the collector's reach
        self.frozen_objects = sglang_cpu.after_start(self.engine) if self.device == "cpu" else []
        self.tokenizer = self.engine.tokenizer_manager.tokenizer
        self.weight_version = 0
        self.can_release_memory = self.device != "cpu" and release_memory_during_train
        self.prefill_shared_prompts = config.prefill_shared_prompts
        self.routing_shape = routed_experts_shape(model_path) if config.return_routing else None

    def generate(self, samples: list[Sample], max_new_tokens: Union[int, list[int]],
                 seeds: Optional[list[int]] = None) -> list[Sample]:
        """Generate each sample's response at its own temperature, or continue it from the tokens it
        already has (a partial rollout resumed under newer weights): appends response ids, rollout
        logprobs and, per new token, the weight version; sets text, finish reason and the latest
        weight version. `max_new_tokens`: one cap for all, or one per sample. `seeds`: one sampling
        seed per sample, used with `rollout.deterministic_sampling`."""
        caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(samples)
        params = [{"temperature": s.temperature, "max_new_tokens": cap} for s, cap in zip(samples, caps)]
        if seeds is not None and self.seeded_requests:
            for p, seed in zip(params, seeds):
                p["sampling_seed"] = seed
        if self.prefill_shared_prompts:
            self.prefill_shared(samples)
        outputs = self.engine.generate(input_ids=[s.tokens for s in samples], sampling_params=params,
                                       return_logprob=True, return_routed_experts=self.routing_shape is not None)
        for s, out in zip(samples, outputs):
            new = list(out["output_ids"])
            if self.routing_shape is not None:
                s.routed_experts = merge_segment_routing(s.routed_experts, decode_routed_experts(out, self.routing_shape))
            s.response_ids = s.response_ids + new
            s.rollout_logprobs = s.rollout_logprobs + [lp for lp, _tok, _text in out["meta_info"]["output_token_logprobs"]]
            s.token_versions = s.token_versions + [self.weight_version] * len(new)
            s.response = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
            s.finish_reason = out["meta_info"]["finish_reason"]["type"]
            s.weight_version = self.weight_version
        return samples

    def prefill_shared(self, samples: list[Sample]) -> None:
        """`prefill_shared_prompts` for the samples' prompts."""
        prefill_shared_prompts(self.engine, [s.prompt_ids for s in samples])

    def generate_turns(self, requests: list[dict]) -> list[dict]:
        """One agent turn per request, token-in/token-out: each request has `input_ids`, `max_new_tokens`,
        `temperature` and optionally `regex`; each result the sampled `output_ids` (a final EOS
        included), their `logprobs`, `finish_reason`, `text`, the engine's `weight_version` and, with
        `rollout.return_routing`, `routed_experts` (every input position's, rollout/sglang/routing.py)."""
        params = [{"temperature": r["temperature"], "max_new_tokens": r["max_new_tokens"],
                   **({"regex": r["regex"]} if r.get("regex") else {})} for r in requests]
        outputs = self.engine.generate(input_ids=[r["input_ids"] for r in requests], sampling_params=params,
                                       return_logprob=True, return_routed_experts=self.routing_shape is not None)
        return [{"output_ids": list(o["output_ids"]),
                 "logprobs": [lp for lp, _tok, _text in o["meta_info"]["output_token_logprobs"]],
                 "finish_reason": o["meta_info"]["finish_reason"]["type"],
                 "text": self.tokenizer.decode(o["output_ids"], skip_special_tokens=True),
                 "weight_version": self.weight_version,
                 **({"routed_experts": decode_routed_experts(o, self.routing_shape)}
                    if self.routing_shape is not None else {})} for o in outputs]

    def context_length(self) -> int:
        """The longest sequence (prompt and output) the engine accepts."""
        return int(self.engine.tokenizer_manager.context_len)

    def complete(self, texts: list[str], max_new_tokens: int, temperature: float = 0.0,
                 regex: Optional[str] = None) -> list[str]:
        """Plain-text completions with the current weights: the policy judging its own samples
        (`rollout/openai_gateway.py`). `regex` constrains the output (SGLang's grammar backend)."""
        params: dict = {"temperature": temperature, "max_new_tokens": max_new_tokens}
        if regex:
            params["regex"] = regex
        outputs = self.engine.generate(prompt=texts, sampling_params=params)
        return [o["text"] for o in outputs]

    def reseed(self, seed: int) -> None:
        """Seed the sampler in every SGLang worker (through the weight-update API, the one way in; no
        weights change). The loop does this at the start of each step, so a step's rollouts do not
        depend on what was sampled before it, and a resumed run repeats them."""
        sglang_loader.run_loader(self.engine, [(sglang_loader.SEED_KEY, torch.tensor([seed], dtype=torch.int64))],
                                 sglang_loader.RESEED)

    # --- weight updates (driven by checkpoint_engine) ------------------------------------------------
    def begin_update(self) -> None:
        """Open SGLang's weight-update session (0.5.23 requires one around tensor loads)."""
        self.engine.begin_weight_update()

    def load_bucket(self, shards: list[tuple[bytes, list[tuple]]]) -> float:
        """Load one bucket, read in place from the receivers' buffers: one (IPC handle, tensors) per TP
        rank, or one that every rank reads (`checkpoint_engine.endpoint.shard_descriptor`). Seconds."""
        start = time.perf_counter()
        ok, message = self.engine.update_weights_from_tensor(
            [(sglang_loader.BUCKET_KEY, sglang_loader.encode_bucket(shards))],
            load_format=sglang_loader.LOAD_BUCKET, flush_cache=False)
        if not ok:
            raise RuntimeError(f"SGLang could not load a weight bucket: {message}")
        return time.perf_counter() - start

    def end_update(self, version: Optional[int]) -> None:
        """Close the session, drop cached prefixes computed with the old weights, adopt `version`
        (None: the push failed; the version stays, and the step reports the failure)."""
        self.engine.end_weight_update()
        self.engine.flush_cache()
        if version is not None:
            self.weight_version = version

    def verify_weights(self, named_tensors: dict[str, torch.Tensor]) -> list[str]:
        """Names of the engine's parameters that differ from what `named_tensors` load to (empty: equal)."""
        reports = sglang_loader.run_reporting(self.engine, list(named_tensors.items()), sglang_loader.VERIFY_WEIGHTS)
        return sorted({name for report in reports for name in report})

    def worker_settings(self) -> list[dict]:
        """Each of the engine's worker (scheduler) processes: its CUDA_VISIBLE_DEVICES ("visible_devices")
        and torch threads ("threads")."""
        return sglang_loader.run_reporting(self.engine, [], sglang_loader.WORKER_SETTINGS)

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
