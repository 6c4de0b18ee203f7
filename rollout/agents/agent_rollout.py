"""Agentic rollouts for the RL loop: episodes instead of single responses (`agent.environment` set).

Wires the pieces for one run: the policy engine's turns (batched), the episode runner, and with
`agent.swarm.enabled` the PARL swarm whose sub-agents run on the frozen sub-agent engine. The loop
calls `start` on each new sample, `run` on the samples of a generation round, `shape` after the task
rewards, and `metrics` for the step's log; `subagent_records` are written to subagents.jsonl.
"""
from __future__ import annotations

import asyncio
import statistics
from typing import Optional

from rewards.builtin.agentic import apply_parl, r_finish, r_parallel
from rl.sample import Sample
from rollout.agents.agent_loop import AgentLimits, AgentRunner, IterationBudget
from rollout.agents.environments import environment_class
from rollout.agents.swarm import Swarm
from rollout.batching import Batcher


def engine_turns(manager, timeout_s: float) -> Batcher:
    """Turns of concurrent episodes batched into `generate_turns` calls through a RolloutManager."""
    return Batcher(lambda _key, requests: manager.generate_turns(requests), timeout_s)


class AgentRollout:
    def __init__(self, agent, task, tokenizer, policy_engine, subagent_engine, timeout_s: float):
        """`agent`: rollout.config.AgentConfig (a TurnFormat, with a SwarmConfig, a SwarmSettings); `task`:
        the run's task settings; the engines are RolloutManagers (rollout/manager.py), `subagent_engine`
        None without a swarm."""
        self.config, self.tokenizer = agent, tokenizer
        self.env_cls = environment_class(agent.environment)
        self.env_options = {**(task.options if task.name == agent.environment else {}), **agent.environment_options}
        self.policy_turns = engine_turns(policy_engine, timeout_s)
        w = agent.swarm
        shared = dict(max_tool_calls=agent.max_tool_calls, max_calls_per_turn=agent.max_calls_per_turn,
                      tool_timeout_s=agent.tool_timeout_s)
        limits = AgentLimits(max_turns=agent.max_turns, max_tokens=agent.max_tokens,
                             max_turn_tokens=agent.max_turn_tokens, **shared,
                             max_critical_steps=w.max_critical_steps if w.enabled else None,
                             max_context=policy_engine.context_length())
        self.swarm: Optional[Swarm] = None
        tools_for = None
        if w.enabled:
            self.subagent_turns = engine_turns(subagent_engine, timeout_s)
            sub_limits = AgentLimits(max_turns=w.subagent_max_turns, max_tokens=w.subagent_max_tokens,
                                     max_turn_tokens=w.subagent_max_turn_tokens, **shared,
                                     max_context=subagent_engine.context_length())
            subagents = AgentRunner(self.subagent_turns.submit, tokenizer, sub_limits, agent, score=False)
            self.swarm = Swarm(subagents, w)
            tools_for = self.swarm.tools
        self.runner = AgentRunner(self.policy_turns.submit, tokenizer, limits, agent, tools_for)

    def start(self, sample: Sample) -> Sample:
        system = self.swarm.settings.system_prompt if self.swarm else None
        return self.runner.start(sample, self.env_cls(**self.env_options), system)

    def run(self, samples: list[Sample], partial: bool = True) -> list[Sample]:
        """Run (or continue) the episodes; with `partial`, each may spend this iteration's budget only."""
        c = self.config
        budget = IterationBudget.starting_now(c.partial_tokens, c.partial_seconds) if partial else None
        return asyncio.run(self.runner.run_all(samples, c.concurrency, budget))

    def shape(self, samples: list[Sample], lambdas: tuple[float, float]) -> None:
        """PARL's auxiliary rewards on top of the task reward (a swarm run), with this step's lambdas."""
        if self.swarm is not None and samples:
            w = self.config.swarm
            apply_parl(samples, *lambdas, w.parallel_reward, w.parallel_cap, w.budget_penalty)

    def metrics(self, samples: list[Sample], lambdas: tuple[float, float]) -> dict[str, float]:
        """The step's episode statistics: steps (critical and total), tools, sub-agents, PARL terms."""
        traces = [s.agent for s in samples if s.agent is not None]
        return episode_metrics(traces, self.config.swarm if self.swarm is not None else None, lambdas)

    def eval_metrics(self, samples: list[Sample]) -> dict[str, float]:
        """The held-out episodes' statistics (as `metrics`, without the step's PARL weights), `eval_` named."""
        return {f"eval_{k}": v for k, v in self.metrics(samples, (0.0, 0.0)).items() if not k.startswith("lambda")}

    @staticmethod
    def subagent_records(samples: list[Sample], step: int) -> list[dict]:
        """The step's sub-agent trajectories, for <run dir>/subagents.jsonl (never trained on)."""
        return [{"step": step, "group_id": s.group_id, "agent": r.agent, "prompt": r.prompt, "message": r.message,
                 "steps": r.steps, "completed": r.completed, "tokens": len(r.response_ids)}
                for s in samples if s.agent is not None for r in s.agent.subagents]


def episode_metrics(traces: list, swarm=None, lambdas: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    """Means over episodes (AgentTrace): steps, tool calls, answers, wall-clock, the share solved (all
    items right) and their critical steps; with `swarm` (a SwarmConfig) the sub-agents and PARL terms."""
    if not traces:
        return {}
    mean = lambda values: float(statistics.fmean(values)) if values else 0.0  # noqa: E731
    out = {"critical_steps": mean([t.critical_steps for t in traces]),
           "total_steps": mean([t.total_steps for t in traces]),
           "turns": mean([t.turns for t in traces]),
           "tool_calls": mean([t.tool_calls for t in traces]),
           "invalid_tool_calls": mean([t.invalid_calls for t in traces]),
           "answered": mean([t.stop == "answer" for t in traces]),
           "episode_seconds": mean([t.seconds for t in traces])}
    solved = [t for t in traces if t.env_reward is not None and t.env_reward >= 1.0]
    out["solved"] = len(solved) / len(traces)
    if solved:  # the latency of a right answer: what parallel sub-agents should cut
        out["critical_steps_solved"] = mean([t.critical_steps for t in solved])
    if swarm is not None:
        stages = [len(st.sub_steps) for t in traces for st in t.stages]
        runs = [r for t in traces for r in t.subagents]
        out.update({"lambda_parallel": lambdas[0], "lambda_finish": lambdas[1],
                    "subagents": mean([len(t.subagents) for t in traces]),
                    "subagents_per_stage": mean(stages),
                    # how wide the stages that assign anything are: 1 is serial
                    "subagents_per_assigning_stage": mean([n for n in stages if n]),
                    "subagent_steps": mean([r.steps for r in runs]),
                    "subagent_tokens": float(sum(len(r.response_ids) for r in runs)),
                    "r_parallel": mean([r_parallel(t, swarm.parallel_reward, swarm.parallel_cap) for t in traces]),
                    "r_finish": mean([r_finish(t) for t in traces])})
    return out
