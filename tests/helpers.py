"""Helpers shared by the tests (spawned test processes import them too): ports, sample groups, the CPU
stand-ins' call log, and trainer ranks built from keyword settings."""
from __future__ import annotations

import dataclasses
import os
import socket

from rl.trainer.config import TrainerConfig

# What the unit tests of the trainer assume unless they say otherwise: a constant lr of 1e-3 from the
# first step and PyTorch's Adam betas (the run's defaults warm up and decay, which these tests do not want).
TEST_TRAINER = dict(lr=1e-3, lr_warmup_steps=0, lr_decay="constant", min_lr_ratio=0.0, adam_betas=(0.9, 0.999))
_FIELDS = {f.name for f in dataclasses.fields(TrainerConfig)}


def trainer_config(**fields) -> TrainerConfig:
    """TrainerConfig with the tests' defaults; world_size defaults to TP * PP (one DP replica)."""
    return TrainerConfig(**{**TEST_TRAINER, **fields})


def make_engine(model_path: str, **settings):
    """A TrainingEngine from one flat set of keywords: TrainerConfig's fields (layout, optimizer, ...)
    and the rank's own (rank, master_port, device, ...)."""
    from rl.trainer.engine import TrainingEngine

    config = trainer_config(**{k: v for k, v in settings.items() if k in _FIELDS})
    return TrainingEngine(model_path, config, **{k: v for k, v in settings.items() if k not in _FIELDS})


def pick_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a spawned gloo world's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_samples(model_path: str, prompt: str, reference: str, responses, rewards) -> list:
    """One group of Samples for `prompt` (each response closed by EOS) with group-mean advantages."""
    from transformers import AutoTokenizer

    from rl.algo.advantages import group_advantages
    from rl.sample import Sample

    tok = AutoTokenizer.from_pretrained(model_path)
    samples = [Sample(group_id=0, prompt=prompt, prompt_ids=tok.encode(prompt), reference=reference,
                      response_ids=tok.encode(r) + [tok.eos_token_id], reward=w) for r, w in zip(responses, rewards)]
    group_advantages(samples)
    return samples


def stub_calls(path: str) -> list[str]:
    return open(path).read().split() if os.path.exists(path) else []


def run_loop_recording(config, model_path: str, run_dir: str, before_shutdown=None) -> dict:
    """Run `config.steps` steps of the real RL loop (its actors started here and shut down after) and
    record per step what the trainers were given to train on ("batches"), the loop's samples
    ("trained") and its metrics; `before_shutdown(engines)`'s result comes back as "checked"."""
    import ray
    from transformers import AutoTokenizer

    from rl.actors import Actors
    from rl.loop import RLLoop
    from rl.metrics import MetricsLogger

    engines = Actors.start(config, model_path)
    out = {"batches": [], "trained": [], "metrics": [], "checked": None}
    try:
        logger = MetricsLogger(run_dir, config, config.steps, "disabled", "tandem")
        loop = RLLoop(config, engines, AutoTokenizer.from_pretrained(model_path), logger)
        call_trainers = loop.call_trainers

        def spy(method, *args, **kwargs):  # what the trainers are given to train on
            if method == "train_step":
                out["batches"].append(args[0])
            return call_trainers(method, *args, **kwargs)
        loop.call_trainers = spy
        for _ in range(config.steps):
            out["metrics"].append(loop.step())
            out["trained"].append(loop.last_samples)
        if before_shutdown is not None:
            out["checked"] = before_shutdown(engines)
        loop.gateway.close()
        logger.close()
    finally:
        engines.shutdown()
        ray.shutdown()
    return out


def preset(name: str, overrides: list[str]):
    """The `conf/<name>.yaml` job with Hydra `overrides`, loaded and checked, and its model's directory
    (the demo model built and cached if it is the one)."""
    from rl.demo.warm_start import policy_model_path
    from rl.train import preset_config

    config = preset_config(name, overrides)
    return config, policy_model_path(config)
