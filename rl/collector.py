"""Collecting a step's training samples: prompts from the stream, generation rounds on the rollout
engine (single responses or agentic episodes), scoring, reward shaping, dynamic sampling and the
partial-rollout replay buffer.

The loop (rl/loop.py) calls `collect` once per step. A round starts new groups, generates every
unfinished response in flight (at most one partial-rollout segment), scores the groups now complete,
shapes their rewards (budget control, length penalty, PARL) and, with dynamic sampling, drops the
groups whose rewards are all equal. Groups still paused wait in `in_flight` for the next round or step.
"""
from __future__ import annotations

import time
from typing import Optional

from rewards.runner import RewardRunner, part_means
from rl.algo.advantages import group_advantages, uniform_groups
from rl.algo.budget import apply_length_penalty, apply_toggle, apply_truncation_reward, estimate_budgets
from rl.algo.schedules import parl_lambdas, temperature_at
from rl.data.prompts import Prompt, PromptSource, encode_prompt
from rl.sample import Sample
from rollout.agents.agent_rollout import AgentRollout

EVAL_STREAM_START = 1_000_000_000  # held-out prompts: far beyond any training step's range


class Collector:
    def __init__(self, config, rollout_engine, tokenizer, agentic: Optional[AgentRollout]):
        """`config`: the run's rl.config.Config; `agentic`: the episode runner when agent.environment is set."""
        self.config, self.engine, self.tokenizer, self.agentic = config, rollout_engine, tokenizer, agentic
        self.prompts = PromptSource(config.data, config.task, config.seed)
        r = config.rewards
        self.rewards = RewardRunner(r.task_types, r.timeout_s, r.concurrency, r.fallback)
        self.step_index = 0  # the RL step being collected (the loop's counter): temperatures and schedules follow it
        self.next_prompt = 0  # position in the task's prompt stream (dynamic sampling reads ahead)
        # The replay buffer of partial rollouts: groups with a response paused at the per-iteration token
        # budget, continued (under newer weights) in the next round or step before they are trained on.
        self.in_flight: dict[int, list[Sample]] = {}
        self.budgets: Optional[dict[str, int]] = None  # Toggle's per-prompt budgets, estimated once
        self.default_budget: Optional[int] = None  # and over all its prompts, for prompts without their own

    def state_dict(self) -> dict:
        return {"next_prompt": self.next_prompt, "in_flight": self.in_flight, "budgets": self.budgets,
                "default_budget": self.default_budget}

    def load_state_dict(self, state: dict) -> None:
        for key in ("next_prompt", "in_flight", "budgets", "default_budget"):
            setattr(self, key, state[key])

    # --- samples, temperatures, generation, scores --------------------------------------------------
    def make_samples(self, prompts: list[Prompt], samples_per_prompt: int) -> list[Sample]:
        budget = self.config.rollout.max_new_tokens
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]  # chat prompts through the template
        samples = [Sample(group_id=i, prompt=text, prompt_ids=list(ids), reference=p.reference, family=p.family,
                          task_type=p.task_type, max_new_tokens=p.max_new_tokens or budget, metadata=dict(p.metadata))
                   for i, (p, (text, ids)) in enumerate(zip(prompts, encoded)) for _ in range(samples_per_prompt)]
        if self.agentic is not None:
            for s in samples:
                self.agentic.start(s)  # an episode: its environment, tools and prompt
        return samples

    def temperature(self, family: Optional[str] = None) -> float:
        """This step's sampling temperature (rl/algo/schedules.py): the rollout's schedule, or the
        family's own when it sets a start temperature (with its own end, or none: constant)."""
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

    def generate(self, samples: list[Sample], caps: Optional[list[int]] = None, partial: bool = False,
                 temperature: Optional[float] = None) -> list[Sample]:
        """Generate (or continue) each sample at its family's temperature of this step, by default up to
        the rest of its token budget; or run (continue) its episode, within this iteration's budget
        when `partial`."""
        for s in samples:
            s.temperature = self.temperature(s.family) if temperature is None else temperature
        if self.agentic is not None:
            return self.agentic.run(samples, partial)
        caps = caps or [s.max_new_tokens - len(s.response_ids) for s in samples]
        return self.engine.generate(samples, caps)

    def score(self, samples: list[Sample]) -> dict[str, float]:
        """Each task type's rewards (rewards/runner.py); shaping starts from the task reward."""
        metrics = self.rewards.score(samples)
        for s in samples:
            s.reward = s.task_reward
        return metrics

    def estimate_toggle_budgets(self) -> None:
        """Toggle's budgets from the initial policy: K samples for each of the first prompts of the stream."""
        b, r = self.config.budget, self.config.rollout
        samples = self.generate(self.make_samples(self.prompts.prompts(0, b.toggle_estimate_prompts),
                                                  r.samples_per_prompt))
        self.score(samples)
        self.budgets, self.default_budget = estimate_budgets(samples, b.toggle_percentile, b.correct_threshold)

    def shape_rewards(self, samples: list[Sample]) -> dict[str, float]:
        """Budget control and length shaping (rl/algo/budget.py), in the order docs/kimi-methods.md gives."""
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

    def evaluate(self) -> dict[str, float]:
        """Accuracy on held-out prompts (a range of the generated tasks' streams training never reaches,
        and the families' `eval_path` rows), one sample each at the rollout temperature:
        `eval_accuracy` over all and `eval/<family>/accuracy`; with `eval.greedy` also greedy
        (`eval_greedy_accuracy`, `eval/<family>/greedy_accuracy`); for agentic episodes also their
        statistics (`eval_critical_steps`, `eval_subagents`, ...). Empty when nothing is held out."""
        prompts = self.prompts.held_out(EVAL_STREAM_START, self.config.eval.prompts)
        if not prompts:
            return {}
        samples = self.generate(self.make_samples(prompts, 1))
        metrics = self._accuracy(samples, "accuracy")
        if self.agentic is not None:  # episodes: also their steps, sub-agents and wall-clock
            metrics.update(self.agentic.eval_metrics(samples))
        if self.config.eval.greedy:
            metrics.update(self._accuracy(self.generate(self.make_samples(prompts, 1), temperature=0.0),
                                          "greedy_accuracy"))
        return metrics

    def _accuracy(self, samples: list[Sample], name: str) -> dict[str, float]:
        self.score(samples)
        mean = lambda group: sum(float(s.reward) for s in group) / len(group)  # noqa: E731
        return {f"eval_{name}": mean(samples), **{f"eval/{f}/{name}": mean([s for s in samples if s.family == f])
                                                 for f in sorted({s.family for s in samples})}}

    # --- one step's samples ----------------------------------------------------------------------------
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
        for (g, i), s in zip(todo, self.generate(samples, caps, partial=True)):
            if s.agent is None and s.finish_reason == "length" and len(s.response_ids) < s.max_new_tokens:
                s.finish_reason = "paused"  # the segment budget, not the response budget, stopped it
            self.in_flight[g][i] = s
        complete = [g for g, members in self.in_flight.items() if all(m.finish_reason != "paused" for m in members)]
        return [s for g in complete for s in self.in_flight.pop(g)]

    def collect(self, weight_version: int) -> tuple[list[Sample], dict[str, float]]:
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
            for key, value in self.score(complete).items():
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
                s.loss_mask = [float(v == weight_version) * (s.loss_mask[j] if s.loss_mask else 1.0)
                               for j, v in enumerate(s.token_versions)]
        group_advantages(kept, normalize_std=a.std_normalized)
        return kept, {"sampling_rounds": float(rounds), "groups_dropped": float(dropped),
                      "groups_trained": float(len({s.group_id for s in kept})), "reward_seconds": scoring,
                      "groups_in_flight": float(len(self.in_flight)),
                      "mixed_version_samples": float(sum(len(set(s.token_versions)) > 1 for s in kept)), **shaping,
                      **({"data_rows_skipped": float(self.prompts.skipped_rows)}
                         if self.config.data.on_bad_row == "skip" else {}),
                      **failures, **part_means(kept)}
