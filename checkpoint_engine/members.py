"""Waiting on a set of Ray actors' calls together (the trainer ranks of a collective, the members of a
weight push): the first failure is raised as soon as Ray reports it, naming the member, instead of
after the members listed before it have waited out their timeouts. A member that dies while the
others block in a collective with it is reported at once; the others are the caller's to tear down."""
from __future__ import annotations

import time
from typing import Sequence

import ray


class MemberFailed(RuntimeError):
    """One member's call failed (its actor died, it raised, or the set timed out); `cause` is Ray's error."""

    def __init__(self, message: str, member: str, cause: BaseException):
        super().__init__(message)
        self.member, self.cause = member, cause


def first_line(exc: BaseException) -> str:
    """The line of a (remote) traceback that says what went wrong."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and ":" in line]
    return (errors[-1] if errors else lines[-1] if lines else type(exc).__name__).strip()


def gather(refs: Sequence, names: Sequence[str], timeout_s: float, what: str = "call") -> list:
    """The results of `refs` in order; raises `MemberFailed` naming the first member to fail, or those
    still running when `timeout_s` passes."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = ", ".join(names[index[r]] for r in pending)
            raise MemberFailed(f"{what}: {late} did not finish within {timeout_s:g} s", late,
                               TimeoutError(f"{what} timed out"))
        i = index[ready[0]]
        try:
            results[i] = ray.get(ready[0])
        except Exception as exc:  # RayTaskError (the member raised), RayActorError (it died)
            raise MemberFailed(f"{what}: {names[i]} failed: {first_line(exc)}", names[i], exc) from exc
    return results
