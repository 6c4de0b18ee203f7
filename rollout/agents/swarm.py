"""PARL's agent swarm (Kimi K2.5 §3, App. E.8): the trainable orchestrator's two tools.

- `create_subagent(name, system_prompt)` registers a sub-agent for reuse in this episode;
- `assign_task(agent, prompt)` runs a sub-agent episode on the frozen sub-agent engine and returns its
  single final message. The assignments of one orchestrator turn run concurrently: they are that
  stage's parallel branches, and each branch's steps go to the stage (critical-steps accounting).

Sub-agents use the environment's own tools and are served by their own SGLang engine, loaded once
from a fixed checkpoint and never synced. Their trajectories are kept on the orchestrator's trace
(`AgentTrace.subagents`) for logging and accounting; they are separate samples that never reach the
trainers. Only the orchestrator's tokens are trained; each returned message enters its context as a
tool result with loss_mask 0.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from rl.sample import Sample
from rollout.agents.agent_loop import AgentRunner
from rollout.agents.tools import Tool
from rollout.agents.trace import AgentTrace, SubagentRun

DEFAULT_AGENT = "default"  # assignable without creating it: a sub-agent with the environment's system prompt


@dataclass
class SwarmSettings:
    """What the swarm's tools allow (rollout/config.py's SwarmConfig extends it with the run's settings).
    Field metadata holds each field's bounds, checked before a run starts."""
    max_subagents: int = field(default=8, metadata={"ge": 1})  # assignments per episode
    max_parallel: int = field(default=4, metadata={"ge": 1})  # assignments per stage (one orchestrator turn)
    orchestrator_env_tools: bool = False  # also give the orchestrator the environment's tools
    subagent_temperature: float = field(default=1.0, metadata={"gt": 0})  # the sub-agents' sampling temperature
    # bound on one sub-agent's whole episode (its steps still count if cut)
    subagent_timeout_s: float = field(default=300.0, metadata={"gt": 0})
    system_prompt: str = ("You coordinate sub-agents. create_subagent makes one; assign_task gives it a task and "
                          "returns its answer. Assign several tasks in one turn to run them in parallel. "
                          "Put the final answer in <answer></answer>.")


class Swarm:
    def __init__(self, subagents: AgentRunner, settings: SwarmSettings):
        """`subagents`: the runner of sub-agent episodes (the frozen engine's turns, environment tools)."""
        self.subagents, self.settings = subagents, settings

    def tools(self, trace: AgentTrace) -> list[Tool]:
        """The orchestrator's tools in this episode (the agent names it can assign to are enumerated)."""
        names = [DEFAULT_AGENT, *trace.created_subagents]
        tools = [
            Tool("create_subagent", "Create a sub-agent with a name and a system prompt, for reuse.",
                 {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                   "system_prompt": {"type": "string", "maxLength": 64}},
                  "required": ["name", "system_prompt"]},
                 functools.partial(self._create, trace)),
            Tool("assign_task", "Launch a sub-agent on a task; it returns one message when done. Launch "
                                "several in one turn to run them concurrently.",
                 {"type": "object", "properties": {"agent": {"type": "string", "enum": names},
                                                   "prompt": {"type": "string", "maxLength": 48}},
                  "required": ["agent", "prompt"]},
                 functools.partial(self._assign, trace), timeout_s=self.settings.subagent_timeout_s),
        ]
        return tools + (trace.env.tools() if self.settings.orchestrator_env_tools else [])

    def _create(self, trace: AgentTrace, name: str, system_prompt: str) -> str:
        if name == DEFAULT_AGENT or name in trace.created_subagents:
            return f"error: a sub-agent named {name} exists"
        trace.created_subagents[name] = system_prompt
        return f"created {name}"

    async def _assign(self, trace: AgentTrace, agent: str, prompt: str) -> str:
        stage = trace.stages[-1]
        if agent != DEFAULT_AGENT and agent not in trace.created_subagents:
            return f"error: no sub-agent named {agent}; create it first"
        if len(trace.subagents) >= self.settings.max_subagents:
            return f"error: at most {self.settings.max_subagents} sub-agents per episode"
        if len(stage.sub_steps) >= self.settings.max_parallel:
            return f"error: at most {self.settings.max_parallel} sub-agents per turn"
        slot = len(stage.sub_steps)
        stage.sub_steps.append(0)  # claimed now: concurrent assignments of this turn see it
        run = SubagentRun(agent, prompt, message="", steps=0, completed=False)
        trace.subagents.append(run)
        env = trace.env
        episode = Sample(group_id=-1, prompt=prompt, prompt_ids=[], reference=env.reference, metadata=env.metadata,
                         temperature=self.settings.subagent_temperature)
        # its own copy of the environment: resetting it to the sub-task leaves the orchestrator's alone
        self.subagents.start(episode, copy.deepcopy(env), trace.created_subagents.get(agent))
        try:
            await self.subagents.run(episode)
        finally:  # also when the episode is cut off by its timeout: the steps it took still count
            sub: AgentTrace = episode.agent
            run.steps, run.completed = sub.turns, sub.stop == "answer"
            run.message = sub.answer if run.completed else f"(no answer: {sub.stop or 'timed out'})"
            run.prompt_ids, run.response_ids = episode.prompt_ids, episode.response_ids
            stage.sub_steps[slot] = run.steps
        return run.message
