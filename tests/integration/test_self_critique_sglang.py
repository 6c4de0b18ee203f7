"""The self-critique reward end to end against a real SGLang server on CPU (its OpenAI-compatible API)
serving a tiny random model as a frozen judge. Its judgments are noise at that size: the test checks
the plumbing (requests in both orders through the runner), parsing (SGLang's regex-constrained decoding
makes every verdict well-formed), the win rates and the critic-agreement metric."""
import asyncio
import os
import string
import subprocess
import sys
import time
import urllib.request

import pytest

from rewards.builtin.critic_data import judge_pairs, verified_pairs
from rewards.builtin.self_critique import Judge
from rewards.runner import RewardRunner, RewardSpec
from rl.demo.tiny_model import create_tiny_qwen2
from rl.sample import Sample
from tests.helpers import pick_port

VERDICT_REGEX = r"\[\[(A|B|TIE)\]\]"


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    from rollout.sglang import cpu as sglang_cpu

    path = str(tmp_path_factory.mktemp("judge"))
    characters = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # the judge prompt's
    create_tiny_qwen2(path, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, characters=characters, max_position_embeddings=4096)
    sglang_cpu.apply()  # the CPU settings and stand-ins, for the server process too
    port = pick_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", path, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
         "--max-total-tokens", "16384", "--random-seed", "0", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SGLang server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.kill()
        server.wait(30)


def _group(responses, rewards=None):
    samples = [Sample(group_id=0, prompt="Name a prime number.", prompt_ids=[1], reference="", response=r,
                      metadata={"rubrics": ["Answers with a single number."]}) for r in responses]
    for s, r in zip(samples, rewards or []):
        s.task_reward = r
    return samples


@pytest.mark.integration
def test_self_critique_reward_through_a_real_sglang_server(judge_server):
    kwargs = {"base_url": judge_server, "api": "completions", "max_tokens": 8, "extra_body": {"regex": VERDICT_REGEX}}
    runner = RewardRunner({"default": [RewardSpec("self_critique", kwargs=kwargs)]}, timeout_s=240)
    samples = _group(["7", "Good question! 9", "The number 11, which is prime."])
    metrics = runner.score(samples)
    assert metrics["reward_failures"] == 0, [s.reward_failures for s in samples]
    comparisons = [s.reward_parts["self_critique/comparisons"] for s in samples]
    assert comparisons == [4.0, 4.0, 4.0]  # K = 3: each response is in 2 pairs, each judged in both orders
    assert all(s.reward_parts["self_critique/unparseable"] == 0 for s in samples)  # constrained verdicts parse
    # every comparison hands out one point (a win, or two halves), so the win rates account for all 6
    assert sum(s.task_reward * 4 for s in samples) == pytest.approx(6.0)
    assert all(0.0 <= s.task_reward <= 1.0 for s in samples)


@pytest.mark.integration
def test_critic_agreement_with_verified_pairs_through_the_server(judge_server):
    samples = _group(["7", "8", "9", "11"], rewards=[1.0, 0.0, 0.0, 1.0])
    pairs = verified_pairs(samples, correct_threshold=1.0, max_pairs=4, step=0)
    assert len(pairs) == 4

    async def measure():
        judge = Judge(judge_server, api="completions", max_tokens=8, extra_body={"regex": VERDICT_REGEX})
        return await judge_pairs(judge, pairs)

    metrics = asyncio.run(measure())
    assert metrics["critic_pairs"] == 4 and metrics["critic_unparseable"] == 0
    assert 0.0 <= metrics["critic_agreement"] <= 1.0
    assert all(len(p.verdicts) == 2 and None not in p.verdicts for p in pairs)
