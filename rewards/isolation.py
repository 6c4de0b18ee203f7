"""Running one reward call in its own process, so that a call past its timeout can be killed.

Threads cannot be stopped: a sync reward that hangs in a thread keeps that thread (the loop goes on, as
the runner stops waiting). For untrusted or CPU-heavy rewards a process per call is the safe choice:
forked from a forkserver that has already imported the reward modules (so a call costs a fork, not an
interpreter start), given an optional address-space limit, and killed with SIGKILL at the timeout.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import traceback
from typing import Any, Optional

from rewards.registry import BUILTIN_MODULES

_PRELOAD = ["rewards.registry", *BUILTIN_MODULES, "rl.sample"]
_context = None


def context():
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(path: str, per_group: bool, arg: Any, kwargs: dict, memory_mb: Optional[int], conn) -> None:
    try:
        if memory_mb:
            limit = memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from rewards.registry import resolve

        result = resolve(path, per_group).fn(arg, **kwargs)
        if hasattr(result, "__await__"):
            import asyncio

            result = asyncio.run(result)
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as a reason
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))
    finally:
        conn.close()


class ProcessCallError(RuntimeError):
    pass


def call_in_process(path: str, per_group: bool, arg: Any, kwargs: dict, timeout_s: float,
                    memory_mb: Optional[int] = None) -> Any:
    """`resolve(path).fn(arg, **kwargs)` in a fresh child process; kills it after `timeout_s` (raising
    TimeoutError). The child's exception comes back as ProcessCallError with its type and message."""
    ctx = context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(path, per_group, arg, kwargs, memory_mb, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise TimeoutError(f"timed out after {timeout_s:g} s (process killed)")
        try:
            status, *payload = receive.recv()
        except EOFError:
            child.join(1)
            raise ProcessCallError(f"the reward process died (exit code {child.exitcode})") from None
        if status == "error":
            raise ProcessCallError(payload[0])
        return payload[0]
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receive.close()
