"""Surviving faults unattended: which failures restart the job, the record of each restart, and the
shared-memory files that killed processes leave behind.

Two levels, cheapest first:
- a policy rollout engine that dies or hangs is replaced alone (rollout/manager.py, rl/loop.py): the
  step goes on, at most `fault.max_engine_restarts` times in a run; a weight push that fails while
  every engine is alive (a dead weight receiver) is tried once more with a fresh sync group;
- anything else that dies or hangs reaches the driver as a Ray error (the actor died, or raised
  because a peer in its collective died), a timeout, or a failed weight push. The run (rl/loop.py
  `run`) then tears every actor down and starts the job again in the same process from the newest
  complete checkpoint, at most `fault.max_restarts` times, as torchrun's `--max-restarts` does.
Errors of the driver's own code (a config, a reward function, a bug) are not retried.
Every recovery goes to the console and to `<run dir>/restarts.jsonl` with its cause, the step it hit,
the checkpoint a restart resumed from and the seconds it cost.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Optional

import ray

from checkpoint_engine.group import SyncError
from checkpoint_engine.members import MemberFailed, first_line

log = logging.getLogger(__name__)
RESTARTABLE = (ray.exceptions.RayError, TimeoutError, SyncError, MemberFailed, ConnectionError)
# /dev/shm files named after the process that made them: torch's shared tensors, SGLang's message queues
_PID_FILES = re.compile(r"^(?:torch_|sgl_shm_mq_)(\d+)_")
SHM = "/dev/shm"


def restartable(exc: BaseException) -> bool:
    return isinstance(exc, RESTARTABLE)


def describe(exc: BaseException) -> str:
    """One line: who failed and how (an actor's class and pid when it died; else the error's type and
    the line of its (remote) traceback that says what went wrong)."""
    if isinstance(exc, MemberFailed):
        return f"{exc.member}: {describe(exc.cause)}"
    if isinstance(exc.__cause__, MemberFailed):  # a SyncError raised from the member's failure
        return f"{type(exc).__name__} in {describe(exc.__cause__)}"
    if isinstance(exc, ray.exceptions.RayActorError):
        text = str(exc)
        who = re.search(r"class_name: (\w+)", text)
        pid = re.search(r"\bpid: (\d+)", text)
        return (f"{type(exc).__name__}: the {who.group(1) if who else 'actor'}"
                f"{f' (pid {pid.group(1)})' if pid else ''} died")
    return f"{type(exc).__name__}: {first_line(exc)}"


class RestartLog:
    """Counts recoveries against their budgets and writes each to the console and `restarts.jsonl`
    (`run_dir` None: the console only)."""

    def __init__(self, run_dir: Optional[str], max_restarts: int, max_engine_restarts: int = 0):
        self.path = os.path.join(run_dir, "restarts.jsonl") if run_dir is not None else None
        self.max_restarts, self.count = max_restarts, 0
        self.max_engine_restarts, self.engine_count = max_engine_restarts, 0
        self._lost: Optional[tuple[float, int]] = None  # (when it failed, the step it was in)

    def _write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def engine_failed(self, engine: int, exc: BaseException, step_index: int) -> None:
        """Rollout engine `engine` failed during step `step_index` + 1; raises `exc` again once
        fault.max_engine_restarts are spent (the job restart takes over)."""
        if self.engine_count >= self.max_engine_restarts:
            raise exc
        self.engine_count += 1
        log.warning("step %d: rollout engine %d failed (%s); replacing it (engine restart %d of %d, "
                    "fault.max_engine_restarts)", step_index + 1, engine, describe(exc), self.engine_count,
                    self.max_engine_restarts)

    def recovered(self, kind: str, exc: BaseException, step_index: int, seconds: float, **details) -> None:
        """A recovery without a job restart (`kind`: engine_restart, push_retry) took `seconds`."""
        self._write({"recovery": kind, "step": step_index + 1, "cause": describe(exc), "seconds_lost": seconds,
                     "time": time.time(), **details})
        log.warning("step %d: %s done in %.1f s", step_index + 1, kind.replace("_", " "), seconds)

    def failed(self, exc: BaseException, step_index: int) -> None:
        """A restartable failure during step `step_index` + 1; raises `exc` again once the budget is spent."""
        cause = describe(exc)
        self._write({"restart": self.count + 1, "step": step_index + 1, "cause": cause, "time": time.time(),
                     "budget_left": self.max_restarts - self.count - 1})
        if self.count >= self.max_restarts:
            log.error("step %d failed (%s); fault.max_restarts=%d restarts spent, stopping", step_index + 1, cause,
                      self.max_restarts)
            raise exc
        self.count += 1
        self._lost = (time.monotonic(), step_index)
        log.warning("step %d failed (%s); restarting the job from its newest checkpoint (restart %d of %d, "
                    "fault.max_restarts)", step_index + 1, cause, self.count, self.max_restarts)

    def resumed(self, checkpoint: Optional[str], step_index: int) -> None:
        if self._lost is not None:
            self._write({"restart": self.count, "resumed_from": checkpoint, "resumed_at_step": step_index})

    def progressed(self, step_index: int) -> None:
        """Call between steps: once the run is back at the step the failure hit, the time it lost."""
        if self._lost is not None and step_index >= self._lost[1]:
            seconds = time.monotonic() - self._lost[0]
            self._write({"restart": self.count, "back_at_step": step_index + 1, "seconds_lost": seconds})
            log.warning("restart %d: back at step %d after %.1f s", self.count, step_index + 1, seconds)
            self._lost = None


def remove_stale_shared_memory(directory: str = SHM) -> int:
    """Delete this user's /dev/shm files left by processes that no longer exist (a SIGKILLed trainer or
    engine cannot unlink them; each holds its memory until removed). Returns how many were removed."""
    if not os.path.isdir(directory):
        return 0
    removed, uid = 0, os.getuid()
    for name in os.listdir(directory):
        match = _PID_FILES.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid == uid:
                os.unlink(path)
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
