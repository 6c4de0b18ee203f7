"""Multi-turn tool-using episodes, token-in/token-out.

An episode is one `Sample`: `prompt_ids` hold the system prompt, the tools and the task; every turn's
sampled ids are appended to `response_ids` exactly as SGLang returned them (with their logprobs and
weight version, `loss_mask` 1), and every tool result is tokenised once and appended with `loss_mask`
0 and logprob 0. History is never re-tokenised, so the trainer scores exactly the sampled tokens.

Episodes are coroutines: many run at once (a semaphore bounds them) and their turns reach the rollout
engine batched (rollout/batching.py). Limits per episode: turns, tool calls, response tokens (tool
results included), tokens per turn, and optionally critical steps. With a per-iteration budget
(tokens or seconds), an episode that spends it is paused at a turn boundary (`finish_reason`
"paused") and continued by the next call, under whatever weights the engine has then (turn-level
partial rollout, Kimi-Researcher).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from rl.sample import Sample
from rollout.agents.environments.base import Environment
from rollout.agents.tools import Tool, final_answer, parse_tool_calls, run_tool, turn_regex
from rollout.agents.trace import AgentTrace, Stage
from rollout.sglang.routing import merge_segment_routing, trainer_routes_tool_tokens

Generate = Callable[[dict], Awaitable[dict]]  # one turn request -> its result (RolloutEngine.generate_turns)
ToolsFor = Callable[[AgentTrace], list[Tool]]  # the tools an episode has now


@dataclass
class AgentLimits:
    max_turns: int = 6
    max_tool_calls: int = 16
    max_tokens: int = 768  # response tokens of the episode, tool results included
    max_turn_tokens: int = 160
    max_calls_per_turn: int = 4
    tool_timeout_s: float = 30.0
    max_critical_steps: Optional[int] = None  # stop the episode once its critical steps reach this
    max_context: Optional[int] = None  # the engine's context length: prompt and response stay within it


@dataclass
class TurnFormat:
    """How the episode is written: `tool_result` wraps each result (Qwen-style `<tool_response>` by
    default; put a chat template's tool-turn markup here), `constrain_format` makes SGLang sample
    only well-formed calls or a final answer (for small models; Kimi-Researcher trains without a
    format enforcer, the default). rollout/config.py's AgentConfig extends it."""
    tool_result: str = "\n<tool_response>{result}</tool_response>\n"  # each tool result, as the model sees it
    constrain_format: bool = False
    answer_chars: int = field(default=48, metadata={"ge": 1})  # longest final answer under constrain_format
    describe_tools: bool = True  # put the tools' schemas in the prompt

    def check(self) -> None:
        if "{result}" not in self.tool_result:
            raise ValueError(f"tool_result: must contain {{result}} (got {self.tool_result!r})")


@dataclass
class IterationBudget:
    """Turn-level partial rollout: what an episode may spend in this iteration (None: unbounded)."""
    tokens: Optional[int] = None
    deadline: Optional[float] = None  # time.monotonic() after which episodes pause at their next turn

    @classmethod
    def starting_now(cls, tokens: Optional[int], seconds: Optional[float]) -> "IterationBudget":
        return cls(tokens, None if seconds is None else time.monotonic() + seconds)


def render_prompt(tokenizer, system: str, tools: list[Tool], task: str, describe_tools: bool) -> list[int]:
    """The episode's context before its first turn: the tokenizer's chat template when it has one,
    else a plain layout."""
    schemas = [t.schema() for t in tools] if describe_tools else []
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        return tokenizer.apply_chat_template(messages, tools=schemas or None, add_generation_prompt=True)
    listed = "".join("\n" + json.dumps(s["function"]) for s in schemas)
    return tokenizer.encode(f"{system}{listed}\nTask: {task}\n", add_special_tokens=False)


class AgentRunner:
    def __init__(self, generate: Generate, tokenizer, limits: AgentLimits, fmt: TurnFormat,
                 tools_for: Optional[ToolsFor] = None, score: bool = True):
        """`tools_for(trace)`: the episode's tools (default: its environment's); `score`: ask the
        environment for the episode's reward at its end (sub-agents' episodes are not scored)."""
        self.generate, self.tokenizer, self.limits, self.fmt, self.score = generate, tokenizer, limits, fmt, score
        self.tools_for = tools_for or (lambda trace: trace.env.tools())

    def start(self, sample: Sample, env: Environment, system_prompt: Optional[str] = None) -> Sample:
        """Reset `env` to the sample's task and write the episode's prompt."""
        trace = AgentTrace(env=env)
        task = env.reset(sample.prompt, sample.reference, sample.metadata)
        sample.prompt_ids = render_prompt(self.tokenizer, system_prompt or env.system_prompt, self.tools_for(trace),
                                          task, self.fmt.describe_tools)
        context = self.limits.max_context
        if context is not None and len(sample.prompt_ids) >= context - 1:
            raise ValueError(f"an episode's prompt (system prompt, tools and task: {len(sample.prompt_ids)} tokens) "
                             f"leaves no room in the engine's context of {context} tokens")
        sample.agent, sample.loss_mask, sample.finish_reason = trace, [], ""
        return sample

    def _stop_reason(self, sample: Sample) -> str:
        trace, lim = sample.agent, self.limits
        if trace.turns >= lim.max_turns:
            return "max_turns"
        if trace.tool_calls >= lim.max_tool_calls:
            return "max_tool_calls"
        if len(sample.response_ids) >= lim.max_tokens:
            return "max_tokens"
        if lim.max_critical_steps is not None and trace.critical_steps >= lim.max_critical_steps:
            return "critical_steps"
        if lim.max_context is not None and len(sample.tokens) >= lim.max_context - 1:
            return "max_context"
        return ""

    async def run(self, sample: Sample, budget: Optional[IterationBudget] = None) -> Sample:
        """Run (or continue) the episode until its final answer, a limit, or the iteration's budget."""
        trace: AgentTrace = sample.agent
        budget = budget or IterationBudget()
        spent, turns_now, started = 0, 0, time.monotonic()
        try:
            while not trace.stop:
                trace.stop = self._stop_reason(sample)  # a limit reached finishes the episode, budget or not
                if trace.stop:
                    break
                if turns_now and ((budget.tokens is not None and spent >= budget.tokens)
                                  or (budget.deadline is not None and time.monotonic() >= budget.deadline)):
                    sample.finish_reason = "paused"
                    return sample
                before = len(sample.response_ids)
                await self._turn(sample)
                spent += len(sample.response_ids) - before
                turns_now += 1
            self._finish(sample)
            return sample
        finally:
            trace.seconds += time.monotonic() - started

    async def _turn(self, sample: Sample) -> None:
        trace, lim = sample.agent, self.limits
        tools = self.tools_for(trace)
        room = lim.max_tokens - len(sample.response_ids)
        if lim.max_context is not None:
            room = min(room, lim.max_context - 1 - len(sample.tokens))
        request: dict[str, Any] = {"input_ids": sample.tokens, "temperature": sample.temperature,
                                   "max_new_tokens": max(1, min(lim.max_turn_tokens, room)),
                                   # the episode's prompt: its turns (and its group's) stay on one engine
                                   "affinity": hash(tuple(sample.prompt_ids))}
        if self.fmt.constrain_format:
            request["regex"] = turn_regex(tools, lim.max_calls_per_turn, self.fmt.answer_chars)
        out = await self.generate(request)
        if "routed_experts" in out:  # MoE routing, for routing replay: tool results left to the trainer
            sample.routed_experts = trainer_routes_tool_tokens(
                merge_segment_routing(sample.routed_experts, out["routed_experts"]), sample)
        start = len(sample.response_ids)
        self._append(sample, out["output_ids"], out["logprobs"], out["weight_version"], trained=True)
        trace.turn_spans.append((start, len(sample.response_ids)))
        trace.stages.append(Stage())  # this turn's main step; sub-agents it assigns add their branches
        sample.weight_version = out["weight_version"]
        calls = parse_tool_calls(out["text"], {t.name: t for t in tools})
        if not calls:
            trace.answer, trace.stop = final_answer(out["text"]), "answer"
            return
        allowed = max(0, min(lim.max_calls_per_turn, lim.max_tool_calls - trace.tool_calls))
        trace.tool_calls += len(calls)
        trace.invalid_calls += sum(c.call is None for c in calls)
        by_name = {t.name: t for t in tools}

        async def result(i: int, parsed) -> str:
            if parsed.call is None:
                return f"error: {parsed.error}"
            if i >= allowed:
                return "error: tool call limit reached"
            tool = by_name[parsed.call.name]
            return await run_tool(tool, parsed.call.arguments, tool.timeout_s or lim.tool_timeout_s)

        results = await asyncio.gather(*(result(i, c) for i, c in enumerate(calls)))
        text = "".join(self.fmt.tool_result.format(result=r) for r in results)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if lim.max_context is not None:  # cut to the context; the next turn then stops at max_context
            ids = ids[: max(0, lim.max_context - len(sample.tokens))]
        self._append(sample, ids, [0.0] * len(ids), out["weight_version"], trained=False)

    @staticmethod
    def _append(sample: Sample, ids: list[int], logprobs: list[float], version: int, trained: bool) -> None:
        sample.response_ids = sample.response_ids + list(ids)
        sample.rollout_logprobs = sample.rollout_logprobs + list(logprobs)
        sample.token_versions = sample.token_versions + [version] * len(ids)
        sample.loss_mask = sample.loss_mask + [1.0 if trained else 0.0] * len(ids)

    def _finish(self, sample: Sample) -> None:
        trace: AgentTrace = sample.agent
        sample.response = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        sample.finish_reason = "stop" if trace.stop == "answer" else "length"
        if not self.score:
            return
        score = trace.env.reward(trace.answer or "")
        trace.env_reward, trace.env_reward_parts = (score if isinstance(score, tuple) else (score, {}))
        trace.env_reward = float(trace.env_reward)

    async def run_all(self, samples: list[Sample], concurrency: int,
                      budget: Optional[IterationBudget] = None) -> list[Sample]:
        """Run the episodes concurrently, at most `concurrency` at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def one(sample: Sample) -> Sample:
            async with gate:
                return await self.run(sample, budget)
        return list(await asyncio.gather(*(one(s) for s in samples)))
