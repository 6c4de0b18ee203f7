"""The RL driver: sample prompts -> roll out K each (SGLang) -> score -> advantages -> Kimi K2 step
(Megatron) -> push weights -> repeat. Engines live in Ray actors colocated in placement-group bundles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from transformers import AutoTokenizer

from checkpoint_engine.engine import CheckpointEngine
from rewards import exact_match
from rl.advantages import group_advantages, uniform_groups
from rl.cluster import colocated_bundles, free_port, in_bundle, start_ray
from rl.config import Config, trainer_layout
from rl.metrics import MetricsLogger
from rl.sample import Sample
from rl.tasks import AdditionTask
from rl.temperature import temperature_at
from rl.training_engine import TrainingEngine, resolve_device
from rl.warm_start import demo_model_path
from rollout.sglang_engine import RolloutEngine


EVAL_STREAM_START = 1_000_000_000  # held-out prompts: far beyond any training step's range



@dataclass
class Engines:
    """The actors of one colocated RL job."""
    trainers: list  # one per training rank (TP x PP x DP), trainer i in bundle i
    rollout: object  # the SGLang engine, in bundle 0 beside trainer rank 0
    sync: CheckpointEngine
    placement_group: object

    @classmethod
    def start(cls, config: Config, model_path: str) -> "Engines":
        world = trainer_layout(config).world_size
        start_ray(config.cluster, num_bundles=world)
        timeout = config.trainer.timeout_s
        pg = colocated_bundles(world, timeout)
        device = resolve_device(config.cluster.device)
        port = free_port()
        t = config.trainer
        trainer_args = dict(
            world_size=world, master_addr="127.0.0.1", master_port=port, tensor_parallel_size=t.tensor_parallel_size,
            pipeline_parallel_size=t.pipeline_parallel_size, expert_parallel_size=t.expert_parallel_size,
            micro_batch_tokens=t.micro_batch_tokens, vocab_pad_multiple=t.vocab_pad_multiple, device=device,
            optimizer=t.optimizer, muon_momentum=t.muon_momentum, qk_clip_tau=t.qk_clip_tau,
            lr=t.lr, lr_warmup_steps=t.lr_warmup_steps, lr_decay=t.lr_decay, min_lr_ratio=t.min_lr_ratio,
            lr_decay_steps=config.steps * config.algorithm.updates_per_step, weight_decay=t.weight_decay,
            adam_betas=t.adam_betas, grad_clip=t.grad_clip, seed=t.seed + config.seed, timeout_s=timeout)
        trainer_cls = ray.remote(TrainingEngine)
        trainers = [
            trainer_cls.options(num_cpus=1, num_gpus=0.5, scheduling_strategy=in_bundle(pg, rank)).remote(
                model_path, rank=rank, **trainer_args)
            for rank in range(world)
        ]
        r = config.rollout
        rollout = ray.remote(RolloutEngine).options(
            num_cpus=1, num_gpus=0.5, scheduling_strategy=in_bundle(pg, 0)).remote(
            model_path, device=device, tensor_parallel_size=r.tensor_parallel_size,
            max_total_tokens=r.max_total_tokens, mem_fraction_static=r.mem_fraction_static,
            seed=config.seed, release_memory_during_train=r.release_memory_during_train)
        # Constructors run in the actors; surface their failures (with a bound) before the loop starts.
        ray.get([a.__ray_ready__.remote() for a in [*trainers, rollout]], timeout=timeout)
        s = config.sync
        sync = CheckpointEngine(trainers, [rollout], [in_bundle(pg, 0)], s.transport, int(s.bucket_mb * 2**20),
                                device, s.timeout_s, s.verify_checksums, s.verify_full)
        sync.setup()
        return cls(trainers, rollout, sync, pg)

    def shutdown(self) -> None:
        try:
            self.sync.teardown()
        except Exception:
            pass
        try:
            ray.get(self.rollout.shutdown.remote(), timeout=60)
        except Exception:
            pass
        for actor in [*self.trainers, self.rollout]:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)


class RLLoop:
    def __init__(self, config: Config, engines: Engines, tokenizer, logger: MetricsLogger | None = None):
        self.config, self.engines, self.tokenizer, self.logger = config, engines, tokenizer, logger
        self.task = AdditionTask(config.task.digits, config.task.seed, config.task.reverse_answer)
        self.weight_version = 0  # the engines start from the same checkpoint: version 0
        self.step_index = 0
        self.next_prompt = 0  # position in the task's prompt stream (dynamic sampling reads ahead)

    def _call_trainers(self, method: str, *args, **kwargs):
        """Call `method` on every trainer rank (they are collective) and return rank 0's result."""
        refs = [getattr(t, method).remote(*args, **kwargs) for t in self.engines.trainers]
        return ray.get(refs, timeout=self.config.trainer.timeout_s)[0]

    def make_samples(self, start: int, num_prompts: int, samples_per_prompt: int) -> list[Sample]:
        problems = self.task.batch(start, num_prompts)
        return [Sample(group_id=i, prompt=p.prompt, prompt_ids=self.tokenizer.encode(p.prompt), reference=p.reference)
                for i, p in enumerate(problems) for _ in range(samples_per_prompt)]

    def temperature(self) -> float:
        """This step's sampling temperature (rl/temperature.py)."""
        r = self.config.rollout
        return temperature_at(self.step_index, r.temperature, r.temperature_end, r.temperature_schedule,
                              r.temperature_decay_steps or self.config.steps)

    def _generate(self, samples: list[Sample], temperature: float) -> list[Sample]:
        return ray.get(self.engines.rollout.generate.remote(samples, self.config.rollout.max_new_tokens, temperature),
                       timeout=self.config.trainer.timeout_s)

    @staticmethod
    def _score(samples: list[Sample]) -> None:
        for s in samples:
            s.reward = exact_match(s.response, s.reference)

    def evaluate(self) -> float:
        """Accuracy on held-out prompts (a range of the task stream training never reaches), one sample each."""
        samples = self._generate(self.make_samples(EVAL_STREAM_START, self.config.eval.prompts, 1), self.temperature())
        self._score(samples)
        return sum(float(s.reward) for s in samples) / len(samples)

    def rollout(self, temperature: float) -> tuple[list[Sample], dict[str, float]]:
        """Generate, score and compute advantages for `prompts_per_step` groups. With dynamic sampling,
        groups whose rewards are all equal are dropped and further prompts generated to refill, for at
        most `max_sampling_rounds` rounds (if none is informative, the last round's groups are kept)."""
        r, a = self.config.rollout, self.config.algorithm
        kept: list[Sample] = []
        rounds = dropped = 0
        scoring = 0.0
        while rounds < (a.max_sampling_rounds if a.filter_uniform_groups else 1):
            needed = r.prompts_per_step - len({s.group_id for s in kept})
            if needed <= 0:
                break
            batch = self.make_samples(self.next_prompt, needed, r.samples_per_prompt)
            for s in batch:
                s.group_id += self.next_prompt  # unique over rounds
            self.next_prompt += needed
            rounds += 1
            batch = self._generate(batch, temperature)
            start = time.perf_counter()
            self._score(batch)
            scoring += time.perf_counter() - start
            uniform = uniform_groups(batch) if a.filter_uniform_groups else set()
            dropped += len(uniform)
            kept += [s for s in batch if s.group_id not in uniform]
        if not kept:
            kept = batch
        group_advantages(kept, normalize_std=a.std_normalized)
        return kept, {"sampling_rounds": float(rounds), "groups_dropped": float(dropped),
                      "groups_trained": float(len({s.group_id for s in kept})), "reward_seconds": scoring}

    def step(self) -> dict[str, float]:
        c, timeout = self.config, self.config.trainer.timeout_s
        step_start = time.perf_counter()
        temperature = self.temperature()

        t0 = time.perf_counter()
        samples, sampling = self.rollout(temperature)
        t1 = time.perf_counter()

        ray.get(self.engines.rollout.release_memory.remote(), timeout=timeout)
        old = self._call_trainers("compute_logprobs", samples, temperature)
        mismatch = 0.0
        for s, lp in zip(samples, old):
            s.old_logprobs = lp
            mismatch = max([mismatch, *(abs(a - b) for a, b in zip(lp, s.rollout_logprobs))])
        if c.algorithm.reset_optimizer_each_step:
            self._call_trainers("reset_optimizer_state")
        groups = len({s.group_id for s in samples})
        train = self._call_trainers("train_step", samples, c.algorithm, temperature,
                                    min(c.algorithm.updates_per_step, groups))
        t3 = time.perf_counter()

        ray.get(self.engines.rollout.resume_memory.remote(), timeout=timeout)
        self.weight_version += 1
        sync = self.engines.sync.push(self.weight_version)
        t4 = time.perf_counter()

        rewards = [float(s.reward) for s in samples]
        metrics = {
            "accuracy": sum(reward == 1.0 for reward in rewards) / len(rewards),
            "reward_mean": sum(rewards) / len(rewards),
            "response_length": sum(len(s.response_ids) for s in samples) / len(samples),
            "loss": train["loss"],
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            "logprob_mismatch_max": mismatch,
            "sample_weight_version": min(s.weight_version for s in samples),
            "weight_version": self.weight_version,
            "temperature": temperature,
            **sampling,
            "rollout_seconds": t1 - t0 - sampling["reward_seconds"],  # every round's generation
            "train_seconds": t3 - t1,
            **sync,
            "sync_seconds": t4 - t3,
            "step_seconds": t4 - step_start,
        }
        if "max_attn_logit" in train:  # MuonClip's QK-Clip is on
            metrics["max_attn_logit"] = train["max_attn_logit"]
        self.step_index += 1
        every = c.eval.every
        if every and (self.step_index % every == 0 or self.step_index == c.steps):
            metrics["eval_accuracy"] = self.evaluate()
        if self.logger is not None:
            self.logger.log(self.step_index, metrics)
        return metrics


def run(config: Config, run_dir: str) -> list[dict[str, float]]:
    """Run `config.steps` RL steps and return their metrics."""
    model_path = config.model.path or demo_model_path(config.model, config.warm_start, config.task)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engines = Engines.start(config, model_path)
    try:
        logger = MetricsLogger(run_dir, config, config.steps, config.logging.wandb_mode, config.logging.wandb_project)
        try:
            loop = RLLoop(config, engines, tokenizer, logger)
            if config.eval.every:
                logger.log(0, {"eval_accuracy": loop.evaluate(), "weight_version": 0})
            return [loop.step() for _ in range(config.steps)]
        finally:
            logger.close()
    finally:
        engines.shutdown()
