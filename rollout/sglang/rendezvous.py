"""Where an SGLang engine's scheduler processes meet to form their process group, in a single-node run.

SGLang's schedulers rendezvous through a torch TCPStore that its rank 0 hosts, and torch's store
server listens on every interface. In a single-node run (the Ray node address is loopback:
rl/cluster.py) the engine hosts the store itself on loopback and points its schedulers at it, with
the two switches SGLang and torch provide for a store created outside them:
`SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE=env://` (rendezvous at MASTER_ADDR:MASTER_PORT) and
`TORCHELASTIC_USE_AGENT_STORE` (every rank, rank 0 too, is a client of an existing store).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional
from unittest import mock

from checkpoint_engine.group import LOOPBACK, node_address, tcp_store


@contextmanager
def schedulers_meet_on_loopback(timeout_s: float = 600.0) -> Iterator[Optional[object]]:
    """Around `sglang.Engine(...)`: in a single-node run, yields the loopback store the schedulers
    started inside will use (keep it as long as the engine lives); elsewhere yields None and changes
    nothing. The environment is set only while the schedulers start (they inherit it)."""
    host, port = node_address()
    if host not in LOOPBACK:
        yield None
        return
    store = tcp_store(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    settings = {"SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE": "env://", "MASTER_ADDR": host, "MASTER_PORT": str(port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with mock.patch.dict(os.environ, settings):  # restored once the schedulers have started
        yield store
