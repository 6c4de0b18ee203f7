"""The RL loop. One step, as named and timed phases:

    generate -> score -> advantages   (rl/collector.py: rollouts on SGLang, rewards/, rl/algo/)
    train                              (rl/trainer/: pi_old logprobs, then the policy update on Megatron)
    sync                               (checkpoint_engine/: the new weights into the rollout engines)
    evaluate, log, checkpoint          (rl/metrics.py, rl/state.py)

The engines live in Ray actors colocated in placement-group bundles (rl/actors.py), the rollout
engines behind a manager that spreads requests over them (rollout/manager.py);
docs/training-signal.md follows one step in detail.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

import ray
from transformers import AutoTokenizer

from checkpoint_engine.members import gather
from rewards.builtin.critic_data import append_jsonl, judge_pairs, verified_pairs
from rewards.builtin.self_critique import make_judge, use_policy
from rl import fault, state
from rl.actors import Actors
from rl.algo.ptx import PTXData
from rl.collector import Collector
from rl.config import Config
from rl.data.tasks import AdditionTask
from rl.demo.warm_start import policy_model_path
from rl.metrics import MetricsLogger, marked_timer, rewind_jsonl, step_metrics
from rl.rollout_dump import read_step, write_step
from rl.sample import Sample
from rollout.agents.agent_rollout import AgentRollout
from rollout.agents.trace import for_training
from rollout.openai_gateway import OpenAIGateway

log = logging.getLogger(__name__)


class RLLoop:
    def __init__(self, config: Config, engines: Actors, tokenizer, logger: MetricsLogger | None = None,
                 restarts: Optional[fault.RestartLog] = None):
        self.config, self.engines, self.tokenizer, self.logger = config, engines, tokenizer, logger
        self.restarts = restarts or fault.RestartLog(None, 0, config.fault.max_engine_restarts)
        task = AdditionTask(config.task.digits, config.task.seed, config.task.reverse_answer)
        self.ptx = PTXData(tokenizer, config.ptx.path, task, config.seed) if config.ptx.coef > 0 else None
        self.weight_version = 0  # the engines start from the same checkpoint: version 0
        self.last_samples: list[Sample] = []  # the last step's trained samples, for inspection
        self.gateway: Optional[OpenAIGateway] = None
        agentic = None
        if engines.rollout is not None:  # None: a replay of dumped samples (rl/rollout_dump.py)
            engines.rollout.replace = self.replace_engine  # a policy engine that fails is replaced alone
            # The current policy behind an OpenAI-compatible endpoint: the default judge of self-critique
            # rewards and of the critic check, and reachable by users' reward code (rewards.builtin.self_critique).
            template = (lambda messages: tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)) if getattr(tokenizer, "chat_template", None) else None
            self.gateway = OpenAIGateway(engines.rollout.complete, chat_template=template,
                                         timeout_s=config.trainer.timeout_s)
            use_policy(self.gateway.url)
            # multi-turn tool episodes instead of single responses (rollout/agents/agent_rollout.py)
            agentic = AgentRollout(config.agent, config.task, tokenizer, engines.rollout, engines.subagents,
                                   config.trainer.timeout_s) if config.agent.environment else None
        self.collector = Collector(config, engines.rollout, tokenizer, agentic)

    @property
    def step_index(self) -> int:
        """The steps done so far; one counter, the collector's, which temperatures and schedules follow."""
        return self.collector.step_index

    @step_index.setter
    def step_index(self, value: int) -> None:
        self.collector.step_index = value

    def call_trainers(self, method: str, *args, **kwargs):
        """Call `method` on every trainer rank (they are collective) and return rank 0's result; a rank that
        dies or fails is reported at once (the others may be blocked in a collective with it)."""
        refs = [getattr(t, method).remote(*args, **kwargs) for t in self.engines.trainers]
        names = [f"trainer rank {i}" for i in range(len(refs))]
        return gather(refs, names, self.config.trainer.timeout_s, f"trainer {method}")[0]

    # --- engine faults (rl/fault.py) -------------------------------------------------------------------
    def replace_engine(self, index: int, cause: BaseException):
        """The rollout manager's callback when policy engine `index` failed: a new one in its bundles,
        with the trainer's current weights; beyond fault.max_engine_restarts, `cause` is raised."""
        self.restarts.engine_failed(index, cause, self.step_index)
        start = time.perf_counter()
        engine = self.engines.replace_rollout_engine(index, self.weight_version)
        self.restarts.recovered("engine_restart", cause, self.step_index, time.perf_counter() - start, engine=index)
        return engine

    def call_engines(self, method: str) -> None:
        """`method` on every policy engine; one found dead is replaced, then the call is made again."""
        try:
            self.engines.rollout.call_all(method)
        except ray.exceptions.RayActorError:
            self.engines.rollout.check_health()
            self.engines.rollout.call_all(method)

    # --- the loop's own state, saved with every checkpoint (rl/state.py) -------------------------------
    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "weight_version": self.weight_version, **self.collector.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.step_index, self.weight_version = saved["step_index"], saved["weight_version"]
        self.collector.load_state_dict(saved)

    def evaluate(self) -> dict[str, float]:
        return self.collector.evaluate()

    # --- phases ----------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Samplers and per-request seeds follow the step: rollouts do not depend on what came before."""
        for manager in self.engines.managers:
            manager.begin_step(self.step_index)

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

    def train(self, samples: list[Sample]) -> dict[str, float]:
        """`updates_per_step` optimizer steps (with PTX demonstrations when on). The trainers take pi_old
        from the first update's own forward (and one extra pass only for later updates); their metrics
        include the trainer-rollout mismatch (rl/algo/mismatch.py) over the tokens the current weights
        sampled (older segments of partial rollouts differ by design; tool results were not sampled)."""
        c = self.config
        if self.engines.rollout is not None:
            self.call_engines("release_memory")
        batch = for_training(samples)  # tokens, masks, rewards: no agent traces, no sub-agent trajectories
        if c.algorithm.reset_optimizer_each_step:
            self.call_trainers("reset_optimizer_state")
        groups = len({s.group_id for s in samples})
        ptx = self.ptx.batch(self.step_index, c.ptx.samples_per_step) if self.ptx is not None else []
        return self.call_trainers("train_step", batch, c.algorithm, min(c.algorithm.updates_per_step, groups),
                                  ptx, c.ptx.coef, self.weight_version)

    def sync(self) -> dict[str, float]:
        """The new weights, one version up, into the rollout engines (a replay has none). A push that
        fails is made once more, with a fresh sync group (new receivers) and any dead engine replaced."""
        self.weight_version += 1
        if self.engines.sync is None:
            return {}
        try:
            self.call_engines("resume_memory")
            return self.engines.sync.push(self.weight_version)
        except fault.RESTARTABLE as exc:  # a trainer rank's death fails the retry too: a job restart
            start = time.perf_counter()
            self.engines.rollout.check_health()
            self.call_engines("resume_memory")
            pushed = self.engines.sync.push(self.weight_version)
            self.restarts.recovered("push_retry", exc, self.step_index, time.perf_counter() - start)
            return pushed

    def collect(self) -> tuple[list[Sample], dict[str, float]]:
        """The step's samples: generated (and dumped, with rollout.dump_dir, before anything trains on
        them), or read back from a dump (rollout.replay_dir)."""
        r, step = self.config.rollout, self.step_index + 1  # numbered as in metrics.jsonl
        if r.replay_dir is not None:
            return read_step(r.replay_dir, step), {"reward_seconds": 0.0}
        samples, sampling = self.collector.collect(self.weight_version)
        if r.dump_dir is not None:
            write_step(r.dump_dir, step, samples)
        return samples, sampling

    def step(self) -> dict[str, float]:
        c, timing = self.config, {}
        with marked_timer("step", timing):
            self.begin_step()
            with marked_timer("generate", timing):  # generation rounds, with scoring and shaping inside
                samples, sampling = self.collect()
                critic = self.check_critic(samples)
            with marked_timer("train", timing):
                train = self.train(samples)
            with marked_timer("sync", timing):
                pushed = self.sync()
        collector = self.collector
        metrics = {
            **step_metrics(samples, train, c.budget.correct_threshold),
            "sample_weight_version": min(min(s.token_versions, default=s.weight_version) for s in samples),
            "weight_version": self.weight_version,
            "temperature": collector.temperature(),  # the rollout's schedule; families with their own follow
            **{f"temperature/{name}": collector.temperature(name) for name, f in c.data.families.items()
               if f.temperature is not None},
            **sampling,
            # per engine since the last step's log (its evaluation too)
            **(self.engines.rollout.take_metrics() if self.engines.rollout else {}),
            **critic,
            **(collector.agentic.metrics(samples, collector.parl_lambdas()) if collector.agentic else {}),
            # every round's generation, without its scoring
            "rollout_seconds": timing["generate"] - sampling["reward_seconds"] - critic.get("critic_seconds", 0.0),
            "train_seconds": timing["train"],
            **pushed,
            "sync_seconds": timing["sync"],
            "step_seconds": timing["step"],
        }
        self.last_samples = samples
        self.step_index += 1
        if collector.agentic is not None and self.logger is not None:  # numbered as in metrics.jsonl
            append_jsonl(collector.agentic.subagent_records(samples, self.step_index),
                         os.path.join(os.path.dirname(self.logger.path), "subagents.jsonl"))
        every = c.eval.every
        if every and (self.step_index % every == 0 or self.step_index == c.steps):
            metrics.update(self.evaluate())
        if self.logger is not None:
            self.logger.log(self.step_index, metrics)
        return metrics


def run(config: Config, run_dir: str) -> list[dict[str, float]]:
    """Run (or resume) the RL job up to `config.steps` steps and return the metrics of the steps run.
    A member that dies or hangs restarts the job from its newest checkpoint (rl/fault.py)."""
    model_path = policy_model_path(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    root = config.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    logger = MetricsLogger(run_dir, config, config.steps, config.logging.wandb_mode, config.logging.wandb_project)
    restarts = fault.RestartLog(run_dir, config.fault.max_restarts, config.fault.max_engine_restarts)
    metrics: dict[int, dict[str, float]] = {}  # by step: a step run again after a restart replaces its first try
    resume = config.checkpoint.resume
    progress = [0]  # the step index the job is at, for the restart record
    try:
        while True:
            try:
                _attempt(config, model_path, tokenizer, logger, root, resume, restarts, metrics, progress)
                return [metrics[step] for step in sorted(metrics)]
            except fault.RESTARTABLE as exc:
                restarts.failed(exc, progress[0])  # raises once fault.max_restarts are spent
                resume = "auto"
    finally:
        logger.close()


def _attempt(config: Config, model_path: str, tokenizer, logger: MetricsLogger, root: str, resume: Optional[str],
             restarts: fault.RestartLog, metrics: dict, progress: list[int]) -> None:
    """Start the actors, restore the newest checkpoint if asked, run the remaining steps, stop the actors
    (killed outright after a failure: some may be blocked in a collective with a dead member)."""
    k = config.checkpoint
    fault.remove_stale_shared_memory()  # left by the processes of a killed run or attempt
    resume_from = state.resume_path(resume, root)
    engines = Actors.start(config, model_path)
    loop, failed = None, True
    try:
        loop = RLLoop(config, engines, tokenizer, logger, restarts)
        if resume_from is not None:
            state.restore(loop, resume_from)
            logger.resumed_at(loop.step_index)
            _rewind_step_files(os.path.dirname(logger.path), loop.step_index)
            log.info("resumed from %s at step %d", resume_from, loop.step_index)
        else:
            if restarts.count or resume is not None:  # a restart before the first checkpoint starts over
                logger.resumed_at(0)
                _rewind_step_files(os.path.dirname(logger.path), 0)
            if config.eval.every and (evaluation := loop.evaluate()):
                logger.log(0, {**evaluation, "weight_version": 0})
        restarts.resumed(resume_from, loop.step_index)
        while loop.step_index < config.steps:
            progress[0] = loop.step_index
            restarts.progressed(loop.step_index)
            done = loop.step()
            metrics[loop.step_index] = done
            if k.every and loop.step_index % k.every == 0:
                state.save(loop, root, k.keep)
        failed = False
    finally:
        if loop is not None and loop.gateway is not None:
            loop.gateway.close()
        engines.shutdown(graceful=not failed)


def _rewind_step_files(run_dir: str, step: int) -> None:
    """The per-step records beside metrics.jsonl, back to `step` (the steps after it run again)."""
    rewind_jsonl(os.path.join(run_dir, "subagents.jsonl"), lambda r: r["step"] <= step)  # numbered as metrics
    rewind_jsonl(os.path.join(run_dir, "critic_pairs.jsonl"), lambda r: r["step"] < step)  # by step_index
