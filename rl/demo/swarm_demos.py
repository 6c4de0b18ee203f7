"""Synthetic, correct episodes of the PARL swarm on wide search, for the swarm demo's warm start.

A random tiny model writes no tool calls, so PARL has nothing to reinforce. These demonstrations teach
the protocol, token for token as the agent loop (rollout/agents/agent_loop.py) writes an episode: the
same rendered prompt, each turn's calls as `ToolCall.render` writes them followed by the end-of-sequence
token the engine returns, and each tool result wrapped by `agent.tool_result` (not trained on).

- An orchestrator episode assigns each item of the task to a sub-agent ("city of e03"), over one to
  `items` turns as the plan says, optionally after creating a named sub-agent, then answers with the
  sub-agents' values in order. Most plans are serial (one item a turn) by default: the demonstrated
  orchestrator is correct but slow, and under a critical-steps budget a serial plan runs out of steps;
  RL has to find the parallel plans.
- A sub-agent episode looks its item up and answers with the value.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from rollout.agents.agent_loop import render_prompt
from rollout.agents.environments.knowledge_base import WideSearchEnvironment
from rollout.agents.swarm import DEFAULT_AGENT, Swarm
from rollout.agents.tools import ToolCall
from rollout.agents.trace import AgentTrace

NAMED_AGENT = "finder"
NAMED_AGENT_PROMPT = "Look one fact up."

IGNORE = -100  # label of a token that is not trained on (prompt, tool results)
RECIPE_VERSION = 1  # bump when the demonstrations change, so cached and committed models are rebuilt


@dataclass
class Episode:
    """One demonstration: its token ids and labels (the id where the policy writes it, else IGNORE)."""
    ids: list[int]
    labels: list[int]


class SwarmDemos:
    def __init__(self, tokenizer, agent, task_options: dict, mix, seed: int):
        """`agent`: rollout.config.AgentConfig (its turn format and swarm settings); `task_options`: the
        wide-search task's options (entities, items, kb_seed); `mix`: rl.demo.config.SwarmDemoConfig."""
        self.tokenizer, self.agent, self.options, self.mix, self.seed = tokenizer, agent, dict(task_options), mix, seed

    def episode(self, index: int) -> Episode:
        """The index-th demonstration (a pure function of the seed and the index)."""
        rng = random.Random(f"swarm-demo/{self.seed}/{index}")
        if rng.random() < self.mix.subagent_episodes:
            return self.subagent_episode(index, rng)
        return self.orchestrator_episode(index, rng)

    def batch(self, start: int, size: int) -> list[Episode]:
        return [self.episode(i) for i in range(start, start + size)]

    # --- the two roles --------------------------------------------------------------------------------
    def orchestrator_episode(self, index: int, rng: random.Random) -> Episode:
        attribute, entities, base = WideSearchEnvironment.draw(index, self.seed, **self.options)
        env = WideSearchEnvironment(**self.options)
        problem = WideSearchEnvironment.generate(index, self.seed, **self.options)
        env.reset(problem.prompt, problem.reference, {})
        tools = Swarm(None, self.agent.swarm).tools(AgentTrace(env=env))
        episode = self._start(self.agent.swarm.system_prompt, tools, problem.prompt)
        agent = DEFAULT_AGENT
        if rng.random() < self.mix.create_subagent:
            agent = NAMED_AGENT
            self._turn(episode, [ToolCall("create_subagent", {"name": agent, "system_prompt": NAMED_AGENT_PROMPT})],
                       [f"created {agent}"])
        values = [base[e][attribute] for e in entities]
        for group in self.plan(len(entities), rng):
            self._turn(episode, [ToolCall("assign_task", {"agent": agent, "prompt": f"{attribute} of {entities[i]}"})
                                 for i in group], [values[i] for i in group])
        self._answer(episode, ",".join(values))
        return episode

    def subagent_episode(self, index: int, rng: random.Random) -> Episode:
        attribute, entities, _ = WideSearchEnvironment.draw(index, self.seed, **self.options)
        named = rng.random() < self.mix.create_subagent
        return self.subagent_demo(attribute, rng.choice(entities), NAMED_AGENT_PROMPT if named else None)

    def subagent_demo(self, attribute: str, entity: str, system_prompt: Optional[str] = None) -> Episode:
        """A sub-agent given "<attribute> of <entity>" (with a created agent's system prompt, or the
        environment's): one lookup, then the value as its answer."""
        env = WideSearchEnvironment(**self.options)
        episode = self._start(system_prompt or env.system_prompt, env.tools(), f"{attribute} of {entity}")
        value = env.base[entity][attribute]
        self._turn(episode, [ToolCall("lookup", {"entity": entity, "attribute": attribute})], [value])
        self._answer(episode, value)
        return episode

    def plan(self, items: int, rng: random.Random) -> list[list[int]]:
        """The items' indices grouped by the turn that assigns them: one a turn (serial), all in one turn
        (parallel) or, otherwise, split in two turns at a random point."""
        order = list(range(items))
        draw = rng.random()
        if items == 1 or draw < self.mix.serial:
            return [[i] for i in order]
        if draw < self.mix.serial + self.mix.parallel:
            return [order]
        cut = rng.randint(1, items - 1)
        return [order[:cut], order[cut:]]

    # --- writing an episode as the agent loop does ----------------------------------------------------
    def _start(self, system: str, tools, task: str) -> Episode:
        ids = render_prompt(self.tokenizer, system, tools, task, self.agent.describe_tools)
        return Episode(list(ids), [IGNORE] * len(ids))

    def _turn(self, episode: Episode, calls: list[ToolCall], results: list[str]) -> None:
        self._written(episode, "".join(c.render() for c in calls))
        shown = self.tokenizer.encode("".join(self.agent.tool_result.format(result=r) for r in results),
                                      add_special_tokens=False)
        episode.ids += shown
        episode.labels += [IGNORE] * len(shown)

    def _answer(self, episode: Episode, answer: str) -> None:
        self._written(episode, f"<answer>{answer}</answer>")

    def _written(self, episode: Episode, text: str) -> None:
        """A turn the policy writes: its tokens and the end-of-sequence token that ends it, trained on."""
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        episode.ids += ids
        episode.labels += ids


def demo_format(agent) -> dict:
    """The run's settings the demonstrations are written with: part of the warm start's cache key."""
    return {"recipe": RECIPE_VERSION, "system_prompt": agent.swarm.system_prompt, "tool_result": agent.tool_result,
            "describe_tools": agent.describe_tools}
