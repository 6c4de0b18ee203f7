"""The OpenAI-compatible gateway to the rollout engine, with a stand-in engine: the official OpenAI
client's completions and chat requests, SGLang's `regex` passed through, and concurrent requests with
the same settings batched into one generation. (In the loop, with the real engine:
tests/integration/test_integration_rewards.py.)"""
import asyncio
import concurrent.futures

import pytest
from openai import AsyncOpenAI, OpenAI

from rollout.openai_gateway import OpenAIGateway


@pytest.fixture
def gateway():
    calls = []
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def complete(texts, max_tokens, temperature, regex):
        calls.append((list(texts), max_tokens, temperature, regex))
        return pool.submit(lambda: [f"{t[::-1][:max_tokens]}|{regex}" for t in texts])

    gw = OpenAIGateway(complete, chat_template=lambda messages: " / ".join(m["content"] for m in messages))
    yield gw, calls
    gw.close()
    pool.shutdown()


def test_completions_and_chat_through_the_openai_client(gateway):
    gw, calls = gateway
    client = OpenAI(base_url=gw.url, api_key="none")
    assert [m.id for m in client.models.list().data] == ["policy"]
    reply = client.completions.create(model="policy", prompt="abc", max_tokens=2, temperature=0.0,
                                       extra_body={"regex": "[a-z]+"})
    assert reply.choices[0].text == "cb|[a-z]+"
    chat = client.chat.completions.create(model="policy", max_tokens=8, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "ih / fei|None"  # template applied, then reversed (the stand-in)
    assert calls[0] == (["abc"], 2, 0.0, "[a-z]+")


def test_concurrent_requests_with_the_same_settings_are_one_generation(gateway):
    gw, calls = gateway

    async def ask():
        client = AsyncOpenAI(base_url=gw.url, api_key="none")
        return await asyncio.gather(*(client.completions.create(model="policy", prompt=f"p{i}", max_tokens=4,
                                                                temperature=0.0) for i in range(6)))

    replies = asyncio.run(ask())
    assert [r.choices[0].text for r in replies] == [f"{i}p|None" for i in range(6)]
    assert len(calls) < 6 and sum(len(texts) for texts, *_ in calls) == 6
