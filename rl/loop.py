"""The RL driver: sample prompts -> roll out K each (SGLang) -> score and shape rewards -> advantages ->
policy update (Megatron) -> push weights -> checkpoint -> repeat. Engines live in Ray actors colocated
in placement-group bundles; docs/training-signal.md follows one step.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from typing import Optional

import ray
from transformers import AutoTokenizer

from rewards.builtin.critic_data import append_jsonl, judge_pairs, verified_pairs
from rewards.runner import RewardRunner, part_means
from rewards.builtin.self_critique import make_judge, use_policy
from rl.algo.advantages import group_advantages, uniform_groups
from rl.algo.budget import apply_length_penalty, apply_toggle, apply_truncation_reward, estimate_budgets
from rl.trainer.checkpoint import MARKER as CHECKPOINT_MARKER
from rl.config import Config
from rl.engines import Engines
from rl.metrics import MetricsLogger
from rl.algo.ptx import PTXData
from rl.sample import Sample
from rl.data.prompts import Prompt, PromptSource
from rl.data.tasks import AdditionTask
from rl.algo.schedules import parl_lambdas, temperature_at
from rl.demo.warm_start import demo_model_path
from rollout.agents.agent_rollout import AgentRollout
from rollout.agents.trace import for_training
from rollout.openai_gateway import OpenAIGateway, ray_complete


log = logging.getLogger(__name__)
EVAL_STREAM_START = 1_000_000_000  # held-out prompts: far beyond any training step's range


class RLLoop:
    def __init__(self, config: Config, engines: Engines, tokenizer, logger: MetricsLogger | None = None):
        self.config, self.engines, self.tokenizer, self.logger = config, engines, tokenizer, logger
        self.prompts = PromptSource(config.data, config.task, config.seed)
        task = AdditionTask(config.task.digits, config.task.seed, config.task.reverse_answer)
        self.ptx = PTXData(tokenizer, config.ptx.path, task, config.seed) if config.ptx.coef > 0 else None
        self.weight_version = 0  # the engines start from the same checkpoint: version 0
        self.step_index = 0
        self.next_prompt = 0  # position in the task's prompt stream (dynamic sampling reads ahead)
        # The replay buffer of partial rollouts: groups with a response paused at the per-iteration token
        # budget, continued (under newer weights) in the next round or step before they are trained on.
        self.in_flight: dict[int, list[Sample]] = {}
        self.last_samples: list[Sample] = []  # the last step's trained samples, for inspection
        self.budgets: Optional[dict[str, int]] = None  # Toggle's per-prompt budgets, estimated once
        self.default_budget: Optional[int] = None  # and over all its prompts, for prompts without their own
        r = config.rewards
        self.rewards = RewardRunner(r.task_types, r.timeout_s, r.concurrency, r.fallback)
        # The current policy behind an OpenAI-compatible endpoint: the default judge of self-critique
        # rewards and of the critic check, and reachable by users' reward code (rewards.builtin.self_critique).
        template = (lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    ) if getattr(tokenizer, "chat_template", None) else None
        self.gateway = OpenAIGateway(ray_complete(engines.rollout), chat_template=template,
                                     timeout_s=config.trainer.timeout_s)
        use_policy(self.gateway.url)
        # multi-turn tool episodes instead of single responses (rollout/agents/agent_rollout.py)
        self.agentic = AgentRollout(config.agent, config.task, tokenizer, engines.rollout, engines.subagents,
                                    config.trainer.timeout_s) if config.agent.environment else None

    def _call_trainers(self, method: str, *args, **kwargs):
        """Call `method` on every trainer rank (they are collective) and return rank 0's result."""
        refs = [getattr(t, method).remote(*args, **kwargs) for t in self.engines.trainers]
        return ray.get(refs, timeout=self.config.trainer.timeout_s)[0]

    def make_samples(self, prompts: list[Prompt], samples_per_prompt: int) -> list[Sample]:
        budget = self.config.rollout.max_new_tokens
        samples = [Sample(group_id=i, prompt=p.prompt, prompt_ids=self.tokenizer.encode(p.prompt),
                          reference=p.reference, family=p.family, task_type=p.task_type,
                          max_new_tokens=p.max_new_tokens or budget, metadata=dict(p.metadata))
                   for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
        if self.agentic is not None:
            for s in samples:
                self.agentic.start(s)  # an episode: its environment, tools and prompt
        return samples

    def temperature(self, family: Optional[str] = None) -> float:
        """This step's sampling temperature (rl/algo/schedules.py): the rollout's schedule, or the family's
        own when it sets a start temperature (with its own end, or none: constant)."""
        r = self.config.rollout
        f = self.config.data.families.get(family) if family else None
        start, end = (f.temperature, f.temperature_end) if f and f.temperature is not None else (r.temperature,
                                                                                                r.temperature_end)
        return temperature_at(self.step_index, start, end, r.temperature_schedule,
                              r.temperature_decay_steps or self.config.steps)

    def parl_lambdas(self) -> tuple[float, float]:
        """PARL's lambda1 and lambda2 this step; by default zero at the run's last step (0-based steps - 1)."""
        w = self.config.agent.swarm
        return parl_lambdas(self.step_index, w.lambda_parallel, w.lambda_finish,
                            w.anneal_steps or max(1, self.config.steps - 1), w.anneal_schedule)

    def _generate(self, samples: list[Sample], caps: Optional[list[int]] = None, partial: bool = False) -> list[Sample]:
        """Generate (or continue) each sample at its family's temperature of this step, by default up to
        the rest of its token budget; or run (continue) its episode, within this iteration's budget
        when `partial`."""
        for s in samples:
            s.temperature = self.temperature(s.family)
        if self.agentic is not None:
            return self.agentic.run(samples, partial)
        caps = caps or [s.max_new_tokens - len(s.response_ids) for s in samples]
        return ray.get(self.engines.rollout.generate.remote(samples, caps), timeout=self.config.trainer.timeout_s)

    def _score(self, samples: list[Sample]) -> dict[str, float]:
        """Each task type's rewards (rewards/runner.py); shaping starts from the task reward."""
        metrics = self.rewards.score(samples)
        for s in samples:
            s.reward = s.task_reward
        return metrics

    def estimate_toggle_budgets(self) -> None:
        """Toggle's budgets from the initial policy: K samples for each of the first prompts of the stream."""
        b, r = self.config.budget, self.config.rollout
        samples = self._generate(self.make_samples(self.prompts.prompts(0, b.toggle_estimate_prompts),
                                                   r.samples_per_prompt))
        self._score(samples)
        self.budgets, self.default_budget = estimate_budgets(samples, b.toggle_percentile, b.correct_threshold)

    def shape_rewards(self, samples: list[Sample]) -> dict[str, float]:
        """Budget control and length shaping (rl/algo/budget.py), in the spec's order."""
        b = self.config.budget
        if b.truncation_reward is not None:
            apply_truncation_reward(samples, b.truncation_reward)
        zeroed = 0
        if b.toggle:
            if self.budgets is None:
                self.estimate_toggle_budgets()
            zeroed = apply_toggle(samples, self.step_index, b.toggle_phase_steps, b.toggle_accuracy_threshold,
                                  self.budgets, self.default_budget, b.correct_threshold)
        if b.length_penalty_weight and self.step_index >= b.length_penalty_start_step:
            apply_length_penalty(samples, b.length_penalty_weight, b.correct_threshold)
        if self.agentic is not None:
            self.agentic.shape(samples, self.parl_lambdas())  # PARL's terms
        return {"toggle_zeroed": float(zeroed)} if b.toggle else {}

    def evaluate(self) -> Optional[float]:
        """Accuracy on held-out prompts (a range of the generated tasks' streams training never reaches),
        one sample each; None when no family has held-out prompts."""
        prompts = self.prompts.held_out(EVAL_STREAM_START, self.config.eval.prompts)
        if not prompts:
            return None
        samples = self._generate(self.make_samples(prompts, 1))
        self._score(samples)
        return sum(float(s.reward) for s in samples) / len(samples)

    def _generation_round(self, fresh: int) -> list[Sample]:
        """Start `fresh` new groups, generate every unfinished response in flight (at most the partial
        rollout segment, within the response budget), and return the groups now complete."""
        r = self.config.rollout
        for s in self.make_samples(self.prompts.prompts(self.next_prompt, fresh), r.samples_per_prompt):
            s.group_id += self.next_prompt  # unique over the run
            self.in_flight.setdefault(s.group_id, []).append(s)
        self.next_prompt += fresh
        todo = [(g, i) for g, members in self.in_flight.items() for i, s in enumerate(members)
                if s.finish_reason in ("", "paused")]
        samples = [self.in_flight[g][i] for g, i in todo]
        caps = [s.max_new_tokens - len(s.response_ids) for s in samples]
        if r.partial_segment_tokens:
            caps = [min(cap, r.partial_segment_tokens) for cap in caps]
        for (g, i), s in zip(todo, self._generate(samples, caps, partial=True)):
            if s.agent is None and s.finish_reason == "length" and len(s.response_ids) < s.max_new_tokens:
                s.finish_reason = "paused"  # the segment budget, not the response budget, stopped it
            self.in_flight[g][i] = s
        complete = [g for g, members in self.in_flight.items() if all(m.finish_reason != "paused" for m in members)]
        return [s for g in complete for s in self.in_flight.pop(g)]

    def rollout(self) -> tuple[list[Sample], dict[str, float]]:
        """Complete `prompts_per_step` groups: generate, score, shape rewards, compute advantages.

        Dynamic sampling drops groups whose rewards are all equal and starts more prompts to refill;
        partial rollouts continue paused groups (from earlier steps first) one segment per round. Both
        stop after `max_sampling_rounds` rounds, except that a step never trains on nothing while
        groups are in flight (then no new prompts start, so it ends). Groups still paused stay in the
        replay buffer for the next step."""
        r, a = self.config.rollout, self.config.algorithm
        partial = r.partial_segment_tokens or self.config.agent.partial_tokens or self.config.agent.partial_seconds
        max_rounds = a.max_sampling_rounds if (a.filter_uniform_groups or partial) else 1
        kept: list[Sample] = []
        complete: list[Sample] = []
        rounds = dropped = 0
        scoring, shaping, failures = 0.0, {}, {}  # type: float, dict[str, float], dict[str, float]
        while len({s.group_id for s in kept}) < r.prompts_per_step:
            if rounds >= max_rounds and (kept or not self.in_flight):
                break
            fresh = 0 if rounds >= max_rounds else r.prompts_per_step - len({s.group_id for s in kept}) - len(self.in_flight)
            complete = self._generation_round(max(0, fresh))
            rounds += 1
            start = time.perf_counter()
            for key, value in self._score(complete).items():
                failures[key] = failures.get(key, 0.0) + value
            for key, value in self.shape_rewards(complete).items():
                shaping[key] = shaping.get(key, 0.0) + value
            scoring += time.perf_counter() - start
            uniform = uniform_groups(complete) if a.filter_uniform_groups else set()
            dropped += len(uniform)
            kept += [s for s in complete if s.group_id not in uniform]
        if not kept:
            kept = complete
        if r.mask_old_segments:  # (tool results stay out)
            for s in kept:
                s.loss_mask = [float(v == self.weight_version) * (s.loss_mask[j] if s.loss_mask else 1.0)
                               for j, v in enumerate(s.token_versions)]
        group_advantages(kept, normalize_std=a.std_normalized)
        return kept, {"sampling_rounds": float(rounds), "groups_dropped": float(dropped),
                      "groups_trained": float(len({s.group_id for s in kept})), "reward_seconds": scoring,
                      "groups_in_flight": float(len(self.in_flight)),
                      "mixed_version_samples": float(sum(len(set(s.token_versions)) > 1 for s in kept)), **shaping,
                      **failures, **part_means(kept)}

    def check_critic(self, samples: list[Sample]) -> dict[str, float]:
        """Every `critic.every` steps: the judge's agreement with the verifiers on this step's
        (verified-correct, verified-wrong) pairs; the pairs are appended to the run's critic_pairs.jsonl."""
        k = self.config.critic
        if not k.every or self.step_index % k.every:
            return {}
        start = time.perf_counter()
        verifiable = [s for s in samples if s.task_type in k.task_types]
        pairs = verified_pairs(verifiable, self.config.budget.correct_threshold, k.max_pairs, self.step_index,
                               seed=self.config.seed + self.step_index)
        metrics = asyncio.run(judge_pairs(make_judge(**k.judge), pairs)) if pairs else {"critic_pairs": 0.0}
        if pairs and self.logger is not None:
            append_jsonl(pairs, os.path.join(os.path.dirname(self.logger.path), "critic_pairs.jsonl"))
        return {**metrics, "critic_seconds": time.perf_counter() - start}

    # --- the loop's own state, saved with every checkpoint ---------------------------------------------
    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "weight_version": self.weight_version, "next_prompt": self.next_prompt,
                "in_flight": self.in_flight, "budgets": self.budgets, "default_budget": self.default_budget}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def save_checkpoint(self, root: str, keep: int) -> str:
        """Every trainer rank saves model, optimizer, lr schedule and RNG, with the loop's state beside
        them; the engine's marker file, written last, makes the checkpoint complete. Older complete
        checkpoints beyond `keep` are removed."""
        path = os.path.join(root, f"step_{self.step_index:06d}")
        shutil.rmtree(path, ignore_errors=True)  # an incomplete one, from a run killed while saving
        self._call_trainers("save_checkpoint", path, extra={"loop": self.state_dict()})
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, path: str) -> None:
        """Load a checkpoint into the trainers and the loop, then push the weights to the engines."""
        extra = self._call_trainers("load_checkpoint", path)
        self.load_state_dict(extra["loop"])
        self.engines.sync.push(self.weight_version)

    def step(self) -> dict[str, float]:
        c, timeout = self.config, self.config.trainer.timeout_s
        step_start = time.perf_counter()
        # the sampler's seed is a function of the step: rollouts do not depend on what came before
        engines = [e for e in (self.engines.rollout, self.engines.subagents) if e is not None]
        ray.get([e.reseed.remote(c.seed * 1_000_003 + self.step_index) for e in engines], timeout=timeout)

        t0 = time.perf_counter()
        samples, sampling = self.rollout()
        critic = self.check_critic(samples)
        t1 = time.perf_counter()

        ray.get(self.engines.rollout.release_memory.remote(), timeout=timeout)
        batch = for_training(samples)  # tokens, masks, rewards: no agent traces, no sub-agent trajectories
        old = self._call_trainers("compute_logprobs", batch)
        mismatch = 0.0
        for s, b, lp in zip(samples, batch, old):
            s.old_logprobs = b.old_logprobs = lp
            # on the tokens the current weights sampled (older segments of partial rollouts differ by design;
            # tool results were not sampled)
            mask = s.loss_mask or [1.0] * len(lp)
            mismatch = max([mismatch, *(abs(a - b) for a, b, v, m in zip(lp, s.rollout_logprobs, s.token_versions, mask)
                                        if v == self.weight_version and m)])
        if c.algorithm.reset_optimizer_each_step:
            self._call_trainers("reset_optimizer_state")
        groups = len({s.group_id for s in samples})
        ptx = self.ptx.batch(self.step_index, c.ptx.samples_per_step) if self.ptx is not None else []
        train = self._call_trainers("train_step", batch, c.algorithm, min(c.algorithm.updates_per_step, groups),
                                    ptx, c.ptx.coef)
        t3 = time.perf_counter()

        ray.get(self.engines.rollout.resume_memory.remote(), timeout=timeout)
        self.weight_version += 1
        sync = self.engines.sync.push(self.weight_version)
        t4 = time.perf_counter()

        rewards = [float(s.reward) for s in samples]
        metrics = {
            "accuracy": sum(float(s.task_reward) >= c.budget.correct_threshold for s in samples) / len(samples),
            "reward_mean": sum(rewards) / len(rewards),
            "truncated": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "response_length": sum(len(s.response_ids) for s in samples) / len(samples),
            "loss": train["loss"],
            "grad_norm": train["grad_norm"],
            "lr": train["lr"],
            "logprob_mismatch_max": mismatch,
            "sample_weight_version": min(min(s.token_versions, default=s.weight_version) for s in samples),
            "weight_version": self.weight_version,
            "temperature": self.temperature(),  # the rollout's schedule; families with their own follow
            **{f"temperature/{name}": self.temperature(name) for name, f in c.data.families.items()
               if f.temperature is not None},
            **sampling,
            **critic,
            **(self.agentic.metrics(samples, self.parl_lambdas()) if self.agentic else {}),
            # every round's generation
            "rollout_seconds": t1 - t0 - sampling["reward_seconds"] - critic.get("critic_seconds", 0.0),
            "train_seconds": t3 - t1,
            **sync,
            "sync_seconds": t4 - t3,
            "step_seconds": t4 - step_start,
        }
        for key in ("ptx_loss", "max_attn_logit"):  # with PTX; with MuonClip's QK-Clip
            if key in train:
                metrics[key] = train[key]
        self.last_samples = samples
        self.step_index += 1
        if self.agentic is not None and self.logger is not None:  # numbered as in metrics.jsonl
            append_jsonl(self.agentic.subagent_records(samples, self.step_index),
                         os.path.join(os.path.dirname(self.logger.path), "subagents.jsonl"))
        every = c.eval.every
        if every and (self.step_index % every == 0 or self.step_index == c.steps):
            accuracy = self.evaluate()
            if accuracy is not None:
                metrics["eval_accuracy"] = accuracy
        if self.logger is not None:
            self.logger.log(self.step_index, metrics)
        return metrics


def complete_checkpoints(root: str) -> list[str]:
    """The complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, CHECKPOINT_MARKER))]


def run(config: Config, run_dir: str) -> list[dict[str, float]]:
    """Run (or resume) the RL job up to `config.steps` steps and return the metrics of the steps run."""
    model_path = config.model.path or demo_model_path(config.model, config.warm_start, config.task)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    k = config.checkpoint
    root = k.dir or os.path.join(run_dir, "checkpoints")
    resume_from = k.resume
    if resume_from == "auto":
        found = complete_checkpoints(root)
        resume_from = found[-1] if found else None
    engines = Engines.start(config, model_path)
    try:
        logger = MetricsLogger(run_dir, config, config.steps, config.logging.wandb_mode, config.logging.wandb_project)
        loop = None
        try:
            loop = RLLoop(config, engines, tokenizer, logger)
            if resume_from is not None:
                loop.resume(resume_from)
                logger.resumed_at(loop.step_index)
                log.info("resumed from %s at step %d", resume_from, loop.step_index)
            elif config.eval.every and (accuracy := loop.evaluate()) is not None:
                logger.log(0, {"eval_accuracy": accuracy, "weight_version": 0})
            metrics = []
            while loop.step_index < config.steps:
                metrics.append(loop.step())
                if k.every and loop.step_index % k.every == 0:
                    loop.save_checkpoint(root, k.keep)
            return metrics
        finally:
            logger.close()
            if loop is not None:
                loop.gateway.close()
    finally:
        engines.shutdown()
