"""Faults, safe defaults and replay on short runs through the CLI (real Ray cluster, Megatron-core and
SGLang).

Chaos: an SGLang scheduler, the rollout engine's actor, a weight receiver and a trainer rank are
SIGKILLed in turn during one run. The engine is replaced alone (twice), the push is made again with a
fresh sync group, and the trainer's death restarts the job from its newest checkpoint; the run must
end with rc 0, every step logged exactly once and equal to an uninterrupted run's, and the weights of
every replaced engine and every push verified against the trainer's (sync.verify_full).

The uninterrupted run is also watched for listening sockets: in single-node mode every one of its
processes listens on loopback only. It dumps its rollouts, and its last step, replayed from them alone
(no SGLang) from the checkpoint before it, repeats its loss and gradient norm."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.integration.test_resume import COMPARED, ROOT, _command, _steps

# (what is killed, how its process is titled), in the order they are killed: one after each of steps 1-4
FAULTS = [("SGLang scheduler", "sglang::scheduler"), ("rollout actor", "ray::RolloutEngine"),
          ("weight receiver", "ray::WeightReceiver"), ("trainer rank", "ray::TrainingEngine")]
# how each is recovered (restarts.jsonl), and whose death the record names
RECOVERIES = [("engine_restart", "RolloutEngine"), ("engine_restart", "RolloutEngine"), ("push_retry", "WeightReceiver"),
              ("restart", "TrainingEngine")]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _process(title: str):
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(title):
            return proc
    return None


def _watch(command, on_tick) -> int:
    """Run `command` (its own session), calling `on_tick(process)` every 50 ms; its return code."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            assert time.monotonic() - start < 900, "the run did not finish"
            on_tick(proc)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _listeners(proc) -> set[tuple[str, str]]:
    """(address, process) of every listening TCP socket of the run's driver and its descendants (Ray's
    GCS, raylet, agents and workers, the SGLang schedulers, torch's store and gloo)."""
    found = set()
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return found
    for p in family:
        try:
            name = f"{p.name()} | {' '.join(p.cmdline())[:60]}"
            found |= {(c.laddr.ip, name) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass  # ended meanwhile
    return found


EXTRA = ["checkpoint.every=1", "sync.verify_full=true", f"fault.max_restarts={len(FAULTS)}"]


@pytest.fixture(scope="module")
def reference(demo_model, tmp_path_factory):
    """The uninterrupted run (its rollouts dumped), with the listening sockets seen while it ran."""
    run, seen = tmp_path_factory.mktemp("reference"), set()
    command = _command(demo_model, run, *EXTRA, f"rollout.dump_dir={run / 'dump'}")
    assert _watch(command, lambda proc: seen.update(_listeners(proc))) == 0
    return run, seen


@pytest.mark.integration
def test_a_single_node_run_listens_on_loopback_only(reference):
    _run_dir, seen = reference
    names = " ".join(sorted({name for _ip, name in seen}))
    for process in ("gcs_server", "raylet", "ray::TrainingEngine", "ray::RolloutEngine", "ray::WeightReceiver"):
        assert process in names, (process, names)  # it looked at Ray, the trainer, the engine, the sync group
    exposed = sorted((ip, name) for ip, name in seen if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))
    assert not exposed, exposed


@pytest.mark.integration
def test_a_run_survives_each_member_killed_and_matches_the_uninterrupted_run(demo_model, reference, tmp_path):
    faulty, kills = tmp_path / "faulty", []

    def kill_next(_proc) -> None:
        """Fault i once the run has recovered from i faults and logged step i + 1 since."""
        recovered = [r for r in _records(faulty / "restarts.jsonl") if "seconds_lost" in r]
        if len(kills) < len(FAULTS) and len(recovered) == len(kills) and os.path.exists(faulty / "metrics.jsonl") \
                and len(kills) + 1 in _steps(faulty) and (target := _process(FAULTS[len(kills)][1])) is not None:
            target.send_signal(signal.SIGKILL)
            kills.append(target.pid)

    assert _watch(_command(demo_model, faulty, *EXTRA), kill_next) == 0
    assert len(kills) == len(FAULTS), f"only {len(kills)} of the faults happened"

    logged = [r["step"] for r in _records(faulty / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 5]  # every step once, in order: the steps after a checkpoint were rewritten
    after, expected = _steps(faulty), _steps(reference[0])
    for step in expected:
        for key in COMPARED:
            assert after[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    records = _records(faulty / "restarts.jsonl")
    failures = [r for r in records if "cause" in r]
    assert [r.get("recovery", "restart") for r in failures] == [kind for kind, _ in RECOVERIES], failures
    for record, (_kind, cause) in zip(failures, RECOVERIES):
        assert cause in record["cause"], record
    lost = [r["seconds_lost"] for r in records if "seconds_lost" in r]
    assert len(lost) == len(FAULTS) and all(s > 0 for s in lost)
    print("seconds lost per fault:", {name: round(s, 1) for (name, _), s in zip(FAULTS, lost)})


@pytest.mark.integration
def test_a_dumped_step_replayed_alone_repeats_its_loss_and_gradient_norm(demo_model, reference, tmp_path):
    run, _seen = reference
    assert sorted(os.listdir(run / "dump")) == [f"step_{n:06d}.jsonl.gz" for n in range(1, 6)]
    processes = set()

    def note(proc) -> None:
        try:
            processes.update(" ".join(p.cmdline())[:40] for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass

    replay = tmp_path / "replay"
    command = _command(demo_model, replay, f"rollout.replay_dir={run / 'dump'}",
                       f"checkpoint.resume={run / 'checkpoints' / 'step_000004'}")
    assert _watch(command, note) == 0
    assert any("TrainingEngine" in p for p in processes)
    assert not any("RolloutEngine" in p or "sglang" in p or "WeightReceiver" in p for p in processes), processes
    replayed, original = _steps(replay), _steps(run)
    assert sorted(replayed) == [5]
    for key in ("loss", "grad_norm", "reward_mean", "accuracy", "response_length", "ptx_loss"):
        assert replayed[5][key] == pytest.approx(original[5][key], rel=1e-6, abs=1e-7), key
