"""Unit tests of agentic rollouts: tool-call parsing, the episode's tokens and loss mask, critical-step
accounting on hand-built episodes, the swarm's tools, and the PARL reward with its annealing. The
rollout engine is a scripted stand-in here; tests/integration/test_integration_agent.py runs the real engines."""
import asyncio
import json
import pickle
import re

import numpy as np
import pytest

from rewards.builtin.agentic import apply_parl, environment_reward, r_finish, r_parallel
from rl.algo.schedules import parl_lambdas
from rl.demo.tiny_model import PRINTABLE, build_tokenizer
from rl.sample import Sample
from rollout.agents.agent_loop import AgentLimits, AgentRunner, IterationBudget, TurnFormat
from rollout.agents.agent_rollout import episode_metrics
from rollout.agents.environments import BUILTIN, EnvironmentTask, environment_class
from rollout.agents.environments.calculator import CalculatorEnvironment, evaluate_arithmetic
from rollout.agents.environments.knowledge_base import WideSearchEnvironment, item_f1, knowledge_base
from rollout.agents.swarm import Swarm, SwarmSettings
from rollout.agents.tools import Tool, ToolCall, final_answer, parse_tool_calls, turn_regex
from rollout.agents.trace import AgentTrace, Stage, SubagentRun, for_training
from rollout.config import SwarmConfig

TOK = build_tokenizer(PRINTABLE)
ECHO = Tool("echo", "Echo the text.", {"type": "object", "properties": {"text": {"type": "string"},
                                                                      "times": {"type": "integer"}},
                                       "required": ["text"]}, lambda text, times=1: text * times)
TOOLS = {"echo": ECHO}


# --- parsing -------------------------------------------------------------------------------------------
def test_parses_valid_calls_in_order():
    text = ('thinking <tool_call>{"name": "echo", "arguments": {"text": "a"}}</tool_call>'
            '<tool_call>{"name": "echo", "arguments": "{\\"text\\": \\"b\\", \\"times\\": 2}"}</tool_call>')
    calls = parse_tool_calls(text, TOOLS)
    assert [c.call for c in calls] == [ToolCall("echo", {"text": "a"}), ToolCall("echo", {"text": "b", "times": 2})]
    assert all(c.error is None for c in calls)


@pytest.mark.parametrize("body, error", [
    ('{"name": "echo", "arguments": {"text": "a"}', "not JSON"),
    ('["echo"]', '{"name"'),
    ('{"name": "nope", "arguments": {}}', "unknown tool 'nope'"),
    ('{"name": "echo", "arguments": {}}', "missing argument 'text'"),
    ('{"name": "echo", "arguments": {"text": 3}}', "argument 'text' must be string"),
    ('{"name": "echo", "arguments": {"text": "a", "times": true}}', "argument 'times' must be integer"),
    ('{"name": "echo", "arguments": {"text": "a", "loud": 1}}', "unknown argument 'loud'"),
    ('{"name": "echo", "arguments": 7}', "arguments are not a JSON object"),
])
def test_malformed_calls_come_back_with_the_reason(body, error):
    [parsed] = parse_tool_calls(f"<tool_call>{body}</tool_call>", TOOLS)
    assert parsed.call is None and error in parsed.error


def test_an_unclosed_call_is_reported_and_plain_text_has_none():
    [parsed] = parse_tool_calls('ok <tool_call>{"name": "echo", "argu', TOOLS)
    assert parsed.call is None and "unclosed" in parsed.error
    assert parse_tool_calls("the answer is <answer>4</answer>", TOOLS) == []
    assert final_answer("so <answer> 4 </answer> done") == "4" and final_answer(" 4 ") == "4"


def test_enums_are_checked():
    env = WideSearchEnvironment()
    [parsed] = parse_tool_calls('<tool_call>{"name": "lookup", "arguments": {"entity": "zz", "attribute": "city"}}'
                                "</tool_call>", {t.name: t for t in env.tools()})
    assert parsed.call is None and "must be one of" in parsed.error


def test_turn_regex_accepts_rendered_calls_and_answers_only():
    env = WideSearchEnvironment()
    pattern = re.compile(turn_regex(env.tools(), max_calls=2, answer_chars=20))
    call = ToolCall("lookup", {"entity": "e03", "attribute": "year"}).render()
    assert pattern.fullmatch(call) and pattern.fullmatch(call + call)
    assert not pattern.fullmatch(call * 3)  # at most max_calls
    assert pattern.fullmatch("<answer>oslo, lima</answer>")
    assert not pattern.fullmatch(ToolCall("lookup", {"entity": "e99", "attribute": "year"}).render())
    assert not pattern.fullmatch("<answer>" + "x" * 21 + "</answer>")
    free = re.compile(turn_regex([ECHO], 1, 8))
    assert free.fullmatch(ToolCall("echo", {"text": "hi there", "times": 3}).render())


# --- episodes ------------------------------------------------------------------------------------------
class ScriptedEngine:
    """Stands in for RolloutEngine.generate_turns: each turn's text comes from `script(prompt_text)`."""

    def __init__(self, script, version: int = 0):
        self.script, self.version, self.requests = script, version, []

    async def __call__(self, request: dict) -> dict:
        self.requests.append(request)
        text = self.script(TOK.decode(request["input_ids"]))
        ids = TOK.encode(text, add_special_tokens=False)[: request["max_new_tokens"] - 1] + [TOK.eos_token_id]
        return {"output_ids": ids, "logprobs": [-0.5] * len(ids), "text": TOK.decode(ids, skip_special_tokens=True),
                "finish_reason": "stop", "weight_version": self.version}


def calculator_script(prompt: str) -> str:
    if "<tool_response>" not in prompt:
        return 'let me compute <tool_call>{"name": "calculator", "arguments": {"expression": "12*34+5"}}</tool_call>'
    return f"<answer>{prompt.rsplit('<tool_response>', 1)[1].split('<')[0]}</answer>"


def run_episode(runner: AgentRunner, env, task: str, reference: str, budget=None) -> Sample:
    sample = runner.start(Sample(group_id=0, prompt=task, prompt_ids=[], reference=reference), env)
    return asyncio.run(runner.run(sample, budget))


def test_episode_keeps_sampled_tokens_and_masks_tool_results():
    engine = ScriptedEngine(calculator_script)
    runner = AgentRunner(engine, TOK, AgentLimits(), TurnFormat())
    s = run_episode(runner, CalculatorEnvironment(), "What is 12*34+5?", "413")
    trace = s.agent
    assert trace.stop == "answer" and trace.answer == "413" and trace.env_reward == 1.0 and trace.seconds > 0
    assert len(s.response_ids) == len(s.loss_mask) == len(s.rollout_logprobs) == len(s.token_versions)
    # token-in/token-out: the second turn's input is exactly the prompt, the first turn's sampled ids and
    # the tool result's ids; trained tokens are exactly the two turns' sampled ids
    (a0, a1), (b0, b1) = trace.turn_spans
    assert engine.requests[1]["input_ids"] == s.prompt_ids + s.response_ids[:b0]
    assert [i for i, m in enumerate(s.loss_mask) if m] == [*range(a0, a1), *range(b0, b1)]
    tool_text = TOK.decode(s.response_ids[a1:b0])
    assert tool_text == "\n<tool_response>413</tool_response>\n"
    assert all(lp == 0.0 for lp in s.rollout_logprobs[a1:b0]) and s.trained_tokens == (a1 - a0) + (b1 - b0)
    assert s.response_ids[a1 - 1] == TOK.eos_token_id  # the turn's sampled end stays in the context


class RoutingEngine(ScriptedEngine):
    """Also reports MoE routing as RolloutEngine does with rollout.return_routing: every input position
    but the last sampled token, here expert = 100 * turn + position in each of 2 layers x top-2."""

    async def __call__(self, request: dict) -> dict:
        out = await super().__call__(request)
        positions = len(request["input_ids"]) + len(out["output_ids"]) - 1
        turn = len(self.requests)
        out["routed_experts"] = np.broadcast_to((100 * turn + np.arange(positions))[:, None, None],
                                                (positions, 2, 2)).astype(np.int16)
        return out


def test_episode_routing_keeps_each_turns_own_and_leaves_tool_results_to_the_trainer():
    engine = RoutingEngine(calculator_script)
    s = run_episode(AgentRunner(engine, TOK, AgentLimits(), TurnFormat()), CalculatorEnvironment(),
                    "What is 12*34+5?", "413")
    (a0, a1), (b0, b1) = s.agent.turn_spans
    routed, p = s.routed_experts[:, 0, 0], len(s.prompt_ids)
    assert s.routed_experts.shape == (len(s.tokens) - 1, 2, 2)
    assert (routed[:p + a1 - 1] == 100 + np.arange(p + a1 - 1)).all()  # the first turn's, as it ran them
    assert (routed[p + a1:p + b0] == -1).all()  # tool result: the trainer routes it
    assert (routed[p + b0:] == 200 + np.arange(p + b0, len(s.tokens) - 1)).all()  # the second turn's
    assert routed[p + a1 - 1] == 200 + p + a1 - 1  # the first turn's last sampled token first ran in turn 2


def test_limits_stop_episodes():
    loop = lambda prompt: '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'  # noqa
    s = run_episode(AgentRunner(ScriptedEngine(loop), TOK, AgentLimits(max_turns=3), TurnFormat()),
                    CalculatorEnvironment(), "What is 1+1?", "2")
    assert s.agent.stop == "max_turns" and s.agent.turns == 3 and s.finish_reason == "length"
    assert s.agent.env_reward == 0.0  # no answer
    s = run_episode(AgentRunner(ScriptedEngine(loop), TOK, AgentLimits(max_tool_calls=2), TurnFormat()),
                    CalculatorEnvironment(), "What is 1+1?", "2")
    assert s.agent.stop == "max_tool_calls" and s.agent.tool_calls == 2
    s = run_episode(AgentRunner(ScriptedEngine(loop), TOK, AgentLimits(max_tokens=150), TurnFormat()),
                    CalculatorEnvironment(), "What is 1+1?", "2")
    assert s.agent.stop == "max_tokens" and s.agent.turns == 2
    engine = ScriptedEngine(loop)
    run_episode(AgentRunner(engine, TOK, AgentLimits(max_tokens=150, max_turn_tokens=100), TurnFormat()),
                CalculatorEnvironment(), "What is 1+1?", "2")
    first, second = engine.requests[:2]
    used = len(second["input_ids"]) - len(first["input_ids"])  # the first turn and its tool result
    assert first["max_new_tokens"] == 100 and second["max_new_tokens"] == 150 - used < 100


def test_malformed_calls_and_failing_tools_are_returned_to_the_model():
    def script(prompt: str) -> str:
        if "<tool_response>" not in prompt:
            return ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
                    '<tool_call>{"name": "calc"}</tool_call>')
        return "<answer>?</answer>"
    s = run_episode(AgentRunner(ScriptedEngine(script), TOK, AgentLimits(), TurnFormat()), CalculatorEnvironment(),
                    "What is 1+1?", "2")
    assert s.agent.tool_calls == 2 and s.agent.invalid_calls == 1
    text = TOK.decode(s.response_ids, skip_special_tokens=True)
    assert "error: ValueError" in text and "unknown tool 'calc'" in text


def test_turn_level_partial_rollout_pauses_at_a_turn_and_continues_under_new_weights():
    engine = ScriptedEngine(calculator_script, version=3)
    runner = AgentRunner(engine, TOK, AgentLimits(), TurnFormat())
    sample = runner.start(Sample(group_id=0, prompt="What is 12*34+5?", prompt_ids=[], reference="413"),
                          CalculatorEnvironment())
    asyncio.run(runner.run(sample, IterationBudget(tokens=1)))
    assert sample.finish_reason == "paused" and sample.agent.turns == 1 and not sample.agent.stop
    sample = pickle.loads(pickle.dumps(sample))  # a checkpoint of the replay buffer, environment included
    engine.version = 4  # the next iteration's weights
    asyncio.run(runner.run(sample, IterationBudget(tokens=1)))
    assert sample.agent.stop == "answer" and sample.agent.env_reward == 1.0
    (a0, a1), (b0, b1) = sample.agent.turn_spans
    assert set(sample.token_versions[a0:a1]) == {3} and set(sample.token_versions[b0:b1]) == {4}


def test_episodes_run_concurrently_within_the_bound():
    in_flight, peak = 0, 0

    async def slow(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return await ScriptedEngine(calculator_script)(request)
    runner = AgentRunner(slow, TOK, AgentLimits(), TurnFormat())
    samples = [runner.start(Sample(group_id=i, prompt="What is 12*34+5?", prompt_ids=[], reference="413"),
                            CalculatorEnvironment()) for i in range(8)]
    done = asyncio.run(runner.run_all(samples, concurrency=3))
    assert peak == 3 and all(s.agent.env_reward == 1.0 for s in done)


# --- environments --------------------------------------------------------------------------------------
def test_environments_generate_checkable_tasks():
    assert sorted(BUILTIN) == ["calculator", "deep_search", "wide_search"]
    with pytest.raises(ValueError, match="unknown environment"):
        environment_class("nope")
    assert environment_class("rollout.agents.environments.calculator:CalculatorEnvironment") is CalculatorEnvironment
    p = EnvironmentTask("calculator", 0, {}).problem(5)
    assert str(evaluate_arithmetic(p.prompt[len("What is "):-1])) == p.reference
    with pytest.raises(ValueError):
        evaluate_arithmetic("__import__('os')")
    base = knowledge_base(0, 24)
    wide = EnvironmentTask("wide_search", 1, {"items": 3}).problem(0)
    entities = re.findall(r"e\d\d", wide.prompt)
    attribute = wide.prompt.split()[2]
    assert len(entities) == 3 and wide.reference == ",".join(base[e][attribute] for e in entities)
    deep = EnvironmentTask("deep_search", 1, {"hops": 2}).problem(0)
    start = re.findall(r"e\d\d", deep.prompt)[0]
    assert deep.reference == base[base[base[start]["next"]]["next"]][deep.prompt.split()[-3]]


def test_item_f1():
    assert item_f1("oslo, lima", "oslo,lima")[0] == 1.0
    f1, parts = item_f1("oslo,rome,x", "oslo,lima")
    assert parts == {"precision": pytest.approx(1 / 3), "recall": 0.5} and f1 == pytest.approx(0.4)
    assert item_f1("", "oslo")[0] == 0.0


# --- critical steps and PARL ---------------------------------------------------------------------------
def trace_with(stages: list[Stage], runs: list[bool] = ()) -> AgentTrace:
    return AgentTrace(env=None, stages=stages,
                      subagents=[SubagentRun("a", "p", "m", 1, done) for done in runs])


def test_critical_steps_on_hand_built_episodes():
    # stage 1: orchestrator spawns 3 sub-agents taking 2, 5 and 3 steps; stage 2: a direct tool call;
    # stage 3: two sub-agents of 4 steps; stage 4: the answer
    t = trace_with([Stage(1, [2, 5, 3]), Stage(1, []), Stage(1, [4, 4]), Stage(1, [])])
    assert t.critical_steps == (1 + 5) + 1 + (1 + 4) + 1 == 13
    assert t.total_steps == (1 + 10) + 1 + (1 + 8) + 1 == 22
    serial = trace_with([Stage(1, [2]), Stage(1, [5]), Stage(1, [3]), Stage(1, [])])
    assert serial.critical_steps == serial.total_steps == 14  # serial collapse: no saving
    assert trace_with([]).critical_steps == 0


def test_parl_terms_and_annealing():
    t = trace_with([Stage(1, [2, 5, 3]), Stage(1, []), Stage(1, [4]), Stage(1, [])], runs=[True, True, False, True, False])
    assert r_parallel(t, "count", 4) == 1.0 and r_parallel(t, "count", 10) == 0.5
    assert r_parallel(t, "stages", 4) == 0.25  # one stage of four has >= 2 sub-agents
    assert r_finish(t) == 0.6 and r_finish(trace_with([Stage()])) == 0.0
    assert parl_lambdas(0, 0.1, 0.2, 10, "linear") == (0.1, 0.2)
    assert parl_lambdas(5, 0.1, 0.2, 10, "linear") == pytest.approx((0.05, 0.1))
    assert parl_lambdas(10, 0.1, 0.2, 10, "linear") == (0.0, 0.0) == parl_lambdas(50, 0.1, 0.2, 10, "cosine")
    assert parl_lambdas(5, 0.1, 0.2, 10, "cosine") == pytest.approx((0.05, 0.1))
    s = Sample(group_id=0, prompt="", prompt_ids=[], reference="", reward=0.5, agent=t)
    apply_parl([s], 0.1, 0.2, "count", 10, budget_penalty=-1.0)
    assert s.reward == pytest.approx(0.5 + 0.1 * 0.5 + 0.2 * 0.6)  # not budget-stopped: no penalty
    t.stop = "critical_steps"
    s.reward = 0.5
    apply_parl([s], 0.0, 0.0, "count", 10, budget_penalty=-1.0)
    assert s.reward == -0.5 and s.reward_parts["parl/r_finish"] == 0.6


def test_episode_metrics_count_solved_episodes_and_stage_width():
    parallel = trace_with([Stage(1, [2, 2, 2]), Stage(1, [])], runs=[True] * 3)
    serial = trace_with([Stage(1, [2]), Stage(1, [2]), Stage(1, [2])], runs=[True] * 3)
    parallel.env_reward, serial.env_reward = 1.0, 0.0
    parallel.seconds, serial.seconds = 2.0, 4.0
    m = episode_metrics([parallel, serial], SwarmConfig(parallel_reward="stages"), (0.3, 0.1))
    assert m["solved"] == 0.5 and m["critical_steps_solved"] == 4  # the parallel one only
    assert m["critical_steps"] == (4 + 9) / 2 and m["episode_seconds"] == 3.0
    assert m["subagents"] == 3 and m["subagents_per_stage"] == 6 / 5 and m["subagents_per_assigning_stage"] == 1.5
    assert m["lambda_parallel"] == 0.3 and m["r_parallel"] == pytest.approx((0.5 + 0) / 2)
    assert "critical_steps_solved" not in episode_metrics([serial]) and "subagents" not in episode_metrics([serial])


def test_environment_reward_reads_the_episode():
    t = trace_with([Stage()])
    t.env_reward, t.env_reward_parts = 0.4, {"recall": 0.5}
    assert environment_reward(Sample(group_id=0, prompt="", prompt_ids=[], reference="", agent=t)) == (0.4, {"recall": 0.5})
    with pytest.raises(ValueError, match="agentic episode"):
        environment_reward(Sample(group_id=0, prompt="", prompt_ids=[], reference=""))


# --- the swarm -----------------------------------------------------------------------------------------
def orchestrator_script(prompt: str) -> str:
    if "<tool_response>" not in prompt:
        entities = re.findall(r"e\d\d", prompt.split("Task:")[1])
        calls = [{"name": "assign_task", "arguments": {"agent": "default", "prompt": f"city of {e}"}} for e in entities]
        return "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)
    found = re.findall(r"<tool_response>([^<]*)</tool_response>", prompt)
    return f"<answer>{','.join(found)}</answer>"


def subagent_script(prompt: str) -> str:
    """Looks up the city of the entity in its task, then answers with it."""
    task = prompt.split("Task:")[1]
    if "<tool_response>" not in task:
        entity = re.findall(r"e\d\d", task)[0]
        return f'<tool_call>{{"name": "lookup", "arguments": {{"entity": "{entity}", "attribute": "city"}}}}</tool_call>'
    return f"<answer>{task.rsplit('<tool_response>', 1)[1].split('<')[0]}</answer>"


def test_swarm_runs_subagents_in_parallel_and_trains_only_the_orchestrator():
    orchestrator, subagent = ScriptedEngine(orchestrator_script), ScriptedEngine(subagent_script)
    subagents = AgentRunner(subagent, TOK, AgentLimits(max_turns=3), TurnFormat(), score=False)
    swarm = Swarm(subagents, SwarmSettings(max_parallel=4))
    runner = AgentRunner(orchestrator, TOK, AgentLimits(max_turn_tokens=400), TurnFormat(), swarm.tools)
    base = knowledge_base(0, 24)
    entities = ["e03", "e11", "e17"]
    reference = ",".join(base[e]["city"] for e in entities)
    s = run_episode(runner, WideSearchEnvironment(), f"Find the city of each of {', '.join(entities)}.", reference)
    trace = s.agent
    assert len(trace.subagents) == 3 and len(trace.stages) == 2 and trace.stages[0].sub_steps == [2, 2, 2]
    assert trace.critical_steps == (1 + 2) + 1 and trace.total_steps == (1 + 6) + 1
    assert trace.env_reward == 1.0 and r_finish(trace) == 1.0  # the orchestrator assembled the sub-agents' answers
    # the orchestrator's trained tokens are its own two turns; sub-agent tokens are not in its sample
    (a0, a1), (b0, b1) = trace.turn_spans
    assert [i for i, m in enumerate(s.loss_mask) if m] == [*range(a0, a1), *range(b0, b1)]
    for run in trace.subagents:
        assert run.response_ids and TOK.decode(run.response_ids) not in TOK.decode(s.response_ids)
    assert all(r["input_ids"][: len(s.prompt_ids)] == s.prompt_ids for r in orchestrator.requests)
    assert for_training([s])[0].agent is None and s.agent is trace


def test_swarm_limits_and_unknown_agents():
    orchestrator = ScriptedEngine(lambda p: "".join(
        f'<tool_call>{{"name": "assign_task", "arguments": {{"agent": "{a}", "prompt": "city of e01"}}}}</tool_call>'
        for a in ("default", "scout", "default", "default")) if "<tool_response>" not in p else "<answer>x</answer>")
    subagents = AgentRunner(ScriptedEngine(subagent_script), TOK, AgentLimits(max_turns=2), TurnFormat(), score=False)
    runner = AgentRunner(orchestrator, TOK, AgentLimits(max_turn_tokens=600, max_tokens=2000), TurnFormat(),
                         Swarm(subagents, SwarmSettings(max_parallel=2)).tools)
    s = run_episode(runner, WideSearchEnvironment(), "Find the city of each of e01.", "x")
    text = TOK.decode(s.response_ids, skip_special_tokens=True)
    assert "argument 'agent' must be one of ['default']" in text and "at most 2 sub-agents per turn" in text
    assert s.agent.invalid_calls == 1
    assert len(s.agent.subagents) == 2 and s.agent.stages[0].sub_steps == [2, 2]
    assert r_finish(s.agent) == 1.0


def test_created_subagents_get_their_system_prompt_and_become_assignable():
    orchestrator = ScriptedEngine(lambda p: (
        '<tool_call>{"name": "create_subagent", "arguments": {"name": "scout", "system_prompt": "Be brief."}}</tool_call>'
        if "<tool_response>" not in p else
        '<tool_call>{"name": "assign_task", "arguments": {"agent": "scout", "prompt": "city of e02"}}</tool_call>'
        if p.count("<tool_response>") == 1 else "<answer>done</answer>"))
    sub_engine = ScriptedEngine(subagent_script)
    subagents = AgentRunner(sub_engine, TOK, AgentLimits(max_turns=2), TurnFormat(), score=False)
    swarm = Swarm(subagents, SwarmSettings())
    runner = AgentRunner(orchestrator, TOK, AgentLimits(), TurnFormat(), swarm.tools)
    s = run_episode(runner, WideSearchEnvironment(), "Find the city of each of e02.", "x")
    assert s.agent.created_subagents == {"scout": "Be brief."}
    assert TOK.decode(sub_engine.requests[0]["input_ids"]).startswith("Be brief.")
    assert [len(st.sub_steps) for st in s.agent.stages] == [0, 1, 0]
    enum = swarm.tools(s.agent)[1].parameters["properties"]["agent"]["enum"]
    assert enum == ["default", "scout"]


def test_the_critical_steps_budget_stops_an_episode():
    orchestrator = ScriptedEngine(lambda p: (
        '<tool_call>{"name": "assign_task", "arguments": {"agent": "default", "prompt": "city of e02"}}</tool_call>'))
    subagents = AgentRunner(ScriptedEngine(subagent_script), TOK, AgentLimits(max_turns=2), TurnFormat(), score=False)
    runner = AgentRunner(orchestrator, TOK, AgentLimits(max_critical_steps=7, max_tokens=4000), TurnFormat(),
                         Swarm(subagents, SwarmSettings()).tools)
    s = run_episode(runner, WideSearchEnvironment(), "Find the city of each of e02.", "x")
    # every stage costs 1 + 2 (the sub-agent's lookup and answer): the budget of 7 is reached after 3 stages
    assert s.agent.stop == "critical_steps" and s.agent.critical_steps == 9 and len(s.agent.stages) == 3


def test_the_python_tool_runs_in_the_sandbox():
    env = CalculatorEnvironment(python_tool=True)
    env.reset("What is 2+2?", "4", {})
    [parsed] = parse_tool_calls('<tool_call>{"name": "python", "arguments": {"code": "import os; print(6*7, os.getuid())"}}'
                                "</tool_call>", {t.name: t for t in env.tools()})
    out = asyncio.run(env.step(parsed.call, timeout_s=30))
    assert out.split()[0] == "42" and out.split()[1] != "0"  # ran, and not as root
    assert env.reward(" 4 ") == 1.0 and env.reward("5") == 0.0


def test_episodes_stay_within_the_context():
    loop = lambda prompt: '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'  # noqa
    engine = ScriptedEngine(loop)
    runner = AgentRunner(engine, TOK, AgentLimits(max_context=600, max_tokens=4000), TurnFormat())
    s = run_episode(runner, CalculatorEnvironment(), "What is 1+1?", "2")
    assert s.agent.stop == "max_context" and len(s.tokens) <= 600 and s.agent.turns == 3
    assert all(len(r["input_ids"]) + r["max_new_tokens"] <= 599 for r in engine.requests)
    with pytest.raises(ValueError, match="leaves no room in the engine's context of 300 tokens"):
        AgentRunner(engine, TOK, AgentLimits(max_context=300), TurnFormat()).start(
            Sample(group_id=0, prompt="What is 1+1?", prompt_ids=[], reference="2"), CalculatorEnvironment())


def test_an_episode_at_its_limit_finishes_even_with_its_budget_spent():
    loop = lambda prompt: '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'  # noqa
    runner = AgentRunner(ScriptedEngine(loop), TOK, AgentLimits(max_turns=2), TurnFormat())
    sample = runner.start(Sample(group_id=0, prompt="What is 1+1?", prompt_ids=[], reference="2"), CalculatorEnvironment())
    asyncio.run(runner.run(sample, IterationBudget(tokens=1)))
    assert sample.finish_reason == "paused"
    asyncio.run(runner.run(sample, IterationBudget(tokens=1)))  # the second turn reaches max_turns
    assert sample.finish_reason == "length" and sample.agent.stop == "max_turns" and sample.agent.turns == 2


def test_a_subagent_cut_off_by_its_timeout_still_counts_its_steps():
    lookup = lambda prompt: '<tool_call>{"name": "lookup", "arguments": {"entity": "e01", "attribute": "city"}}</tool_call>'  # noqa
    slow = ScriptedEngine(lookup)

    async def slow_turn(request):
        await asyncio.sleep(0.1)
        return await slow(request)
    subagents = AgentRunner(slow_turn, TOK, AgentLimits(max_turns=50, max_tokens=10**5), TurnFormat(), score=False)
    orchestrator = ScriptedEngine(lambda p: (
        '<tool_call>{"name": "assign_task", "arguments": {"agent": "default", "prompt": "city of e01"}}</tool_call>'
        if "<tool_response>" not in p else "<answer>x</answer>"))
    runner = AgentRunner(orchestrator, TOK, AgentLimits(), TurnFormat(),
                         Swarm(subagents, SwarmSettings(subagent_timeout_s=0.35)).tools)
    s = run_episode(runner, WideSearchEnvironment(), "Find the city of each of e01.", "x")
    [run] = s.agent.subagents
    assert 2 <= run.steps < 50 and not run.completed and "timed out" in run.message
    assert s.agent.stages[0].sub_steps == [run.steps] and s.agent.critical_steps == 1 + run.steps + 1
    assert "error: assign_task timed out" in TOK.decode(s.response_ids, skip_special_tokens=True)
