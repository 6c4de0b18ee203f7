"""Chaos: one short run (real Ray cluster, Megatron-core and SGLang, through the CLI) during which an
SGLang scheduler, the rollout engine's actor, a weight receiver and a trainer rank are SIGKILLed in
turn. The run restarts itself from its newest checkpoint each time (fault.max_restarts) and must end
with rc 0, every step logged exactly once and equal to an uninterrupted run's, and every push after a
restart verified against the trainer's weights (sync.verify_full)."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.integration.test_resume import COMPARED, ROOT, _command, _run, _steps

# (what is killed, how its process is titled), in the order they are killed: one after each of steps 1-4
FAULTS = [("SGLang scheduler", "sglang::scheduler"), ("rollout actor", "ray::RolloutEngine"),
          ("weight receiver", "ray::WeightReceiver"), ("trainer rank", "ray::TrainingEngine")]
CAUSES = ["RolloutEngine", "RolloutEngine", "WeightReceiver", "TrainingEngine"]  # whose death each restart names


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _process(title: str):
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(title):
            return proc
    return None


def _run_with_faults(command, run) -> list[float]:
    """Run `command`; kill fault i once the run has restarted i times and logged step i + 1 since.
    Returns when each kill happened (seconds since start)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    start, kills = time.monotonic(), []
    try:
        while proc.poll() is None:
            assert time.monotonic() - start < 900, "the run did not finish"
            restarts = [r for r in _records(run / "restarts.jsonl") if "resumed_from" in r]
            if len(kills) < len(FAULTS) and len(restarts) == len(kills) and os.path.exists(run / "metrics.jsonl") \
                    and len(kills) + 1 in _steps(run) and (target := _process(FAULTS[len(kills)][1])) is not None:
                target.send_signal(signal.SIGKILL)
                kills.append(time.monotonic() - start)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, f"rc {proc.returncode} after kills at {kills}"
    return kills


@pytest.mark.integration
def test_a_run_survives_each_member_killed_and_matches_the_uninterrupted_run(demo_model, tmp_path):
    faulty, reference = tmp_path / "faulty", tmp_path / "reference"
    extra = ["checkpoint.every=1", "sync.verify_full=true", f"fault.max_restarts={len(FAULTS)}"]
    kills = _run_with_faults(_command(demo_model, faulty, *extra), faulty)
    assert len(kills) == len(FAULTS), f"only {len(kills)} of the faults happened"
    _run(_command(demo_model, reference, *extra))

    logged = [r["step"] for r in _records(faulty / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5]  # every step once, in order: the steps after a checkpoint were rewritten
    after, expected = _steps(faulty), _steps(reference)
    for step in expected:
        for key in COMPARED:
            assert after[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    records = _records(faulty / "restarts.jsonl")
    failures = [r for r in records if "cause" in r]
    assert [r["restart"] for r in failures] == [1, 2, 3, 4]
    for record, cause in zip(failures, CAUSES):
        assert cause in record["cause"], record
    lost = [r["seconds_lost"] for r in records if "seconds_lost" in r]
    assert len(lost) == len(FAULTS) and all(s > 0 for s in lost)
    print("seconds lost per fault:", {name: round(s, 1) for (name, _), s in zip(FAULTS, lost)})
