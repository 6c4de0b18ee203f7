"""The environment interface of agentic rollouts, Gym-like: `reset` to a task, `step` with a tool call,
`reward` for the final answer.

One instance serves one episode and holds its state (what the tools have seen or changed); it is
pickled with a paused episode, so keep it small. An environment may also generate its own tasks
(`generate`), which the prompt stream uses when `task.name` names it.
"""
from __future__ import annotations

from typing import Any, Union

from rl.sample import Problem
from rollout.agents.tools import Tool, ToolCall, run_tool

Score = Union[float, tuple[float, dict[str, float]]]


class Environment:
    name = ""
    system_prompt = "Solve the task. Call tools when they help; put the final answer in <answer></answer>."

    def __init__(self, **options: Any):
        self.options = options
        self.task = ""
        self.reference = ""
        self.metadata: dict[str, Any] = {}

    @classmethod
    def generate(cls, index: int, seed: int, **options: Any) -> Problem:
        """The index-th generated task (a pure function of seed and index)."""
        raise NotImplementedError(f"environment {cls.name!r} does not generate tasks; give it a prompt set")

    def reset(self, task: str, reference: str, metadata: dict[str, Any]) -> str:
        """Start an episode on `task`; returns the first observation (the user message)."""
        self.task, self.reference, self.metadata = task, reference, dict(metadata)
        return task

    def tools(self) -> list[Tool]:
        return []

    async def step(self, call: ToolCall, timeout_s: float) -> str:
        """Run one (already validated) tool call; a failure or timeout becomes the text the model sees."""
        return await run_tool(next(t for t in self.tools() if t.name == call.name), call.arguments, timeout_s)

    def reward(self, answer: str) -> Score:
        """The task outcome of a final answer (r_perf in PARL)."""
        raise NotImplementedError
