"""rl/fault.py and its helpers: which failures restart the job, the restart record and its budget,
metrics rewound on resume, and the shared-memory files of dead processes removed."""
import json
import os
import subprocess
import sys

import pytest
import ray

from checkpoint_engine.group import SyncError
from checkpoint_engine.members import MemberFailed
from rl.fault import RestartLog, describe, remove_stale_shared_memory, restartable
from rl.metrics import rewind_jsonl

DIED = """The actor died unexpectedly before finishing this task.
\tclass_name: TrainingEngine
\tactor_id: e7409c87b527b9555b6d05ac01000000
\tpid: 17386
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: ..."""


class _Died(ray.exceptions.ActorDiedError):
    def __str__(self):
        return DIED


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_member_deaths_and_timeouts_restart_but_the_drivers_own_errors_do_not():
    assert restartable(_Died()) and restartable(TimeoutError("x")) and restartable(SyncError("x"))
    assert restartable(MemberFailed("m", "trainer rank 1", _Died()))
    assert not restartable(ValueError("a bad reward")) and not restartable(KeyError("x"))


def test_the_cause_names_the_member_and_the_dead_actor_in_one_line():
    assert describe(_Died()) == "_Died: the TrainingEngine (pid 17386) died"
    failed = MemberFailed("trainer train_step: ...", "trainer rank 1", _Died())
    assert describe(failed) == "trainer rank 1: _Died: the TrainingEngine (pid 17386) died"
    try:
        raise SyncError("weight sync push v3 (broadcast)") from failed
    except SyncError as exc:
        assert describe(exc) == "SyncError in trainer rank 1: _Died: the TrainingEngine (pid 17386) died"
    assert "\n" not in describe(RuntimeError("first\nValueError: what went wrong\nmore"))


def test_restarts_are_recorded_with_the_time_lost_and_stop_at_the_budget(tmp_path):
    restarts = RestartLog(str(tmp_path), max_restarts=1)
    restarts.failed(TimeoutError("rollout engines [0] did not answer within 3 s"), step_index=4)
    restarts.resumed("ckpt/step_000004", 4)
    restarts.progressed(3)  # not yet back at the step the fault hit
    restarts.progressed(4)
    restarts.progressed(5)  # recorded once
    with pytest.raises(TimeoutError):
        restarts.failed(TimeoutError("again"), step_index=6)
    records = [json.loads(line) for line in open(tmp_path / "restarts.jsonl")]
    assert [sorted(r) for r in records] == [
        ["budget_left", "cause", "restart", "step", "time"], ["restart", "resumed_at_step", "resumed_from"],
        ["back_at_step", "restart", "seconds_lost"], ["budget_left", "cause", "restart", "step", "time"]]
    assert records[0]["step"] == 5 and records[0]["cause"].startswith("TimeoutError: rollout engines [0]")
    assert records[2]["back_at_step"] == 5 and records[2]["seconds_lost"] >= 0
    assert records[3]["budget_left"] == -1 and restarts.count == 1


def test_rewind_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in [0, 1, 2, 3, 4]))
    rewind_jsonl(str(path), lambda r: r["step"] <= 2)
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1, 2]
    rewind_jsonl(str(tmp_path / "absent.jsonl"), lambda r: True)  # nothing to rewind


def test_only_the_shared_memory_of_dead_processes_is_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    names = [f"torch_{dead}_1234_0", f"sgl_shm_mq_{dead}_abcd", f"torch_{alive}_99_1", f"sgl_shm_mq_{alive}_x",
             "sem.mp-abc", "sglang_loads_1f_2e.shm", "torch_notapid_1"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_shared_memory(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_engine_restarts_have_their_own_budget_and_records(tmp_path):
    restarts = RestartLog(str(tmp_path), max_restarts=3, max_engine_restarts=1)
    died = _Died()
    restarts.engine_failed(0, died, step_index=2)
    restarts.recovered("engine_restart", died, 2, 12.5, engine=0)
    with pytest.raises(_Died):  # the second engine fault escalates to a job restart
        restarts.engine_failed(1, died, step_index=3)
    assert restarts.engine_count == 1 and restarts.count == 0
    (record,) = [json.loads(line) for line in open(tmp_path / "restarts.jsonl")]
    assert record["recovery"] == "engine_restart" and record["engine"] == 0 and record["step"] == 3
    assert record["seconds_lost"] == 12.5 and "TrainingEngine (pid 17386) died" in record["cause"]
    RestartLog(None, 1).recovered("push_retry", died, 0, 1.0)  # without a run directory: the console only
