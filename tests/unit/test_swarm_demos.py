"""The swarm demo's warm-start episodes (rl/demo/swarm_demos.py): replayed through the real agent loop and
swarm by an engine that writes exactly the demonstrated turns, each must come out token for token as
demonstrated, with the loss mask on the written tokens only, the right answer, and the plan's
critical steps."""
from __future__ import annotations

import asyncio
import random
import tempfile

import pytest
from transformers import AutoTokenizer

from rl.demo.config import SwarmDemoConfig
from rl.demo.swarm_demos import IGNORE, NAMED_AGENT_PROMPT, SwarmDemos
from rl.demo.tiny_model import PRINTABLE, build_tokenizer, create_tiny_qwen2
from rl.sample import Sample
from rollout.agents.agent_loop import AgentLimits, AgentRunner
from rollout.agents.environments.knowledge_base import WideSearchEnvironment
from rollout.agents.swarm import Swarm
from rollout.config import AgentConfig

OPTIONS = {"entities": 16, "items": 3}


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer as a run loads it: from a saved tiny model's directory."""
    with tempfile.TemporaryDirectory() as path:
        create_tiny_qwen2(path, 16, 1, 2, 1, 16, characters=PRINTABLE)
        yield AutoTokenizer.from_pretrained(path)


class DemoEngine:
    """Stands in for the engines: continues whichever demonstration the request's tokens are a prefix of,
    with that demonstration's next written turn (up to and including its end-of-sequence token)."""

    def __init__(self, episodes, tokenizer):
        self.episodes, self.tokenizer = episodes, tokenizer

    async def __call__(self, request: dict) -> dict:
        ids = request["input_ids"]
        episode = next(e for e in self.episodes if e.ids[: len(ids)] == ids and len(e.ids) > len(ids))
        end = len(ids)
        while end < len(episode.labels) and episode.labels[end] != IGNORE:
            end += 1
        out = episode.ids[len(ids): end]
        return {"output_ids": out, "logprobs": [-0.1] * len(out), "finish_reason": "stop", "weight_version": 0,
                "text": self.tokenizer.decode(out, skip_special_tokens=True)}


def _replay(demos: SwarmDemos, index: int, rng_seed: int):
    """The index-th orchestrator demonstration and the sample the agent loop makes of it."""
    agent = demos.agent
    episode = demos.orchestrator_episode(index, random.Random(rng_seed))
    attribute, entities, _ = WideSearchEnvironment.draw(index, demos.seed, **OPTIONS)
    subagent_demos = [demos.subagent_demo(attribute, e, system) for e in entities for system in (None, NAMED_AGENT_PROMPT)]
    engine = DemoEngine([episode, *subagent_demos], demos.tokenizer)
    subagents = AgentRunner(engine, demos.tokenizer, AgentLimits(max_turns=2), agent, score=False)
    swarm = Swarm(subagents, agent.swarm)
    runner = AgentRunner(engine, demos.tokenizer, AgentLimits(max_turns=6, max_turn_tokens=400), agent, swarm.tools)
    problem = WideSearchEnvironment.generate(index, demos.seed, **OPTIONS)
    sample = runner.start(Sample(group_id=0, prompt=problem.prompt, prompt_ids=[], reference=problem.reference),
                          WideSearchEnvironment(**OPTIONS), agent.swarm.system_prompt)
    return episode, asyncio.run(runner.run(sample))


@pytest.mark.parametrize("describe_tools", [False, True])
def test_demonstrations_are_what_the_agent_loop_writes(tokenizer, describe_tools):
    agent = AgentConfig(environment="wide_search", describe_tools=describe_tools)
    agent.swarm.max_parallel = 3
    demos = SwarmDemos(tokenizer, agent, OPTIONS, SwarmDemoConfig(create_subagent=0.5), seed=5)
    plans = set()
    for index in range(12):
        episode, sample = _replay(demos, index, rng_seed=index)
        assert sample.prompt_ids + sample.response_ids == episode.ids
        written = [label != IGNORE for label in episode.labels[len(sample.prompt_ids):]]
        assert [m == 1.0 for m in sample.loss_mask] == written
        trace = sample.agent
        assert trace.stop == "answer" and trace.env_reward == 1.0 and trace.invalid_calls == 0
        assert all(run.completed for run in trace.subagents) and len(trace.subagents) == OPTIONS["items"]
        # each assigning stage costs its turn and the sub-agents' two steps; a create and the answer one each
        sizes = tuple(len(stage.sub_steps) for stage in trace.stages if stage.sub_steps)
        created = len(trace.created_subagents)
        assert trace.critical_steps == 3 * len(sizes) + created + 1
        plans.add(sizes)
    assert (1, 1, 1) in plans and len(plans) >= 2  # mostly serial by default, but not only


def test_the_plan_mix_follows_the_config(tokenizer):
    agent = AgentConfig(environment="wide_search")
    mix = SwarmDemoConfig(serial=0.6, parallel=0.1)
    demos = SwarmDemos(tokenizer, agent, OPTIONS, mix, seed=0)
    plans = [tuple(map(len, demos.plan(3, random.Random(i)))) for i in range(2000)]
    assert plans.count((1, 1, 1)) / len(plans) == pytest.approx(0.6, abs=0.04)
    assert plans.count((3,)) / len(plans) == pytest.approx(0.1, abs=0.03)
    assert set(plans) == {(1, 1, 1), (3,), (1, 2), (2, 1)}


def test_the_built_tokenizer_encodes_as_the_saved_one(tokenizer):
    text = 'a\n\n<tool_response>x</tool_response>\n\n\n{"b": 1}  c'
    built = build_tokenizer(PRINTABLE)
    assert built.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert built.decode(built.encode(text, add_special_tokens=False)) == text


def test_the_swarm_preset_finds_its_committed_warm_start():
    """A fresh clone must not fine-tune the swarm's model (minutes): the preset's settings name the
    committed copy. Failing here means the recipe or the preset changed: refresh it with
    `python -m rl.demo.prebuilt --config-name swarm_wide_search`."""
    import json
    import os

    from rl.demo import prebuilt
    from rl.demo.warm_start import demo_model_name
    from rl.train import preset_config

    config = preset_config("swarm_wide_search", [])
    folder = os.path.join(prebuilt.HERE, demo_model_name(config.model, config.warm_start, config.task, config.agent))
    assert os.path.isfile(os.path.join(folder, "model.safetensors")), f"no committed model at {folder}"
    report = json.load(open(os.path.join(folder, "warm_start.json")))
    assert report["steps"] == config.warm_start.steps and report["token_accuracy"] > 0.9
