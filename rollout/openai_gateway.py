"""An OpenAI-compatible HTTP front on the run's rollout engine: the current policy, reachable the way any
model server is (`/v1/completions`, `/v1/chat/completions`, `/v1/models`).

The rollout engine is SGLang's in-process `Engine` inside a Ray actor, with no HTTP server of its own.
Judges (the self-critique reward, the critic check) and users' reward code talk to this gateway, which
runs in the driver on a thread of its own and turns requests into `complete` calls through the rollout
manager (rollout/manager.py), which sends each to the least-loaded engine:
requests that arrive together (a group's pairwise judgments) with the same settings become one batched
generation. Besides the OpenAI fields it accepts SGLang's `regex` (constrained decoding), passed by
OpenAI clients through `extra_body`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional

from rollout.batching import Batcher

# (texts, max_new_tokens, temperature, regex) -> a future of the completions, in order
Complete = Callable[[list[str], int, float, Optional[str]], concurrent.futures.Future]


class OpenAIGateway:
    def __init__(self, complete: Complete, model_name: str = "policy", chat_template: Optional[Callable] = None,
                 timeout_s: float = 120.0, host: str = "127.0.0.1"):
        """`chat_template(messages) -> str`: the policy tokenizer's template (None: contents joined)."""
        import uvicorn

        self.complete, self.model_name, self.timeout_s = complete, model_name, timeout_s
        self.chat_template = chat_template or (lambda messages: "\n".join(str(m.get("content", "")) for m in messages))
        # requests with the same settings that arrive together become one generation
        self.batcher = Batcher(lambda settings, prompts: complete(prompts, *settings), timeout_s)
        sock = socket.socket()
        sock.bind((host, 0))
        self.url = f"http://{host}:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="openai-gateway")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the OpenAI gateway did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def _generate(self, prompt: str, body: dict) -> str:
        settings = (int(body.get("max_tokens") or 256), float(body.get("temperature", 1.0)), body.get("regex"))
        return await self.batcher.submit(prompt, key=settings)

    # --- the HTTP API --------------------------------------------------------------------------------
    def _app(self):
        from fastapi import FastAPI, HTTPException

        app = FastAPI()

        def envelope(kind: str, choices: list) -> dict[str, Any]:
            return {"id": f"{kind}-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
                    "model": self.model_name, "choices": choices}

        async def generate(prompt: str, body: dict) -> str:
            try:
                return await self._generate(prompt, body)
            except Exception as exc:  # noqa: BLE001 - the client sees a 500 with the reason
                raise HTTPException(status_code=500, detail=f"{type(exc).__name__}: {exc}") from None

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "tandem"}]}

        @app.post("/v1/completions")
        async def completions(body: dict):
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            texts = await asyncio.gather(*(generate(p, body) for p in prompts))
            return envelope("text_completion", [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                                                for i, t in enumerate(texts)])

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            text = await generate(self.chat_template(body["messages"]), body)
            return envelope("chat.completion", [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": text}}])
        return app
