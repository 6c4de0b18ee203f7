"""A run killed with SIGKILL mid-way resumes from its last checkpoint and continues exactly as the
uninterrupted run: model, optimizer, lr schedule, RNG, data position, partial-rollout buffer, Toggle
budgets and step counter all come back (real Ray cluster, Megatron-core and SGLang, through the CLI)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("loss", "grad_norm", "lr", "reward_mean", "accuracy", "response_length", "groups_in_flight",
            "groups_trained", "sample_weight_version", "weight_version", "toggle_zeroed", "ptx_loss")


def _command(demo_model, run_dir, *extra):
    return [sys.executable, "-m", "rl.train", f"model.path={demo_model}", "steps=5", "checkpoint.every=2",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
            "rollout.partial_segment_tokens=2", "algorithm.max_sampling_rounds=1",  # a replay buffer across steps
            "budget.toggle=true", "budget.toggle_phase_steps=1", "budget.toggle_estimate_prompts=4",
            "ptx.coef=0.1", "ptx.samples_per_step=2", "eval.every=0", "logging.wandb_mode=disabled",
            f"logging.run_dir={run_dir}", f"hydra.run.dir={run_dir}", *extra]


def _steps(run_dir) -> dict[int, dict]:
    """Each step's record (metrics.jsonl has one per step: a resumed run rewrites those after its checkpoint)."""
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in records}


def _run(command, timeout=600):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
def test_sigkilled_run_resumes_and_continues_like_the_uninterrupted_run(demo_model, tmp_path):
    """The run is killed during step 4, after its step-2 checkpoint and step 3. Resumed with
    `checkpoint.resume=auto`, it repeats step 3 exactly as the run did before the kill: everything
    step 3 depends on (model, optimizer, lr, RNG, data position, the replay buffer of partial rollouts
    crossing step 2, Toggle's budgets) came back from the checkpoint. Then it finishes the run."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(demo_model, run), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (os.path.exists(run / "metrics.jsonl") and 3 in _steps(run)):  # step 3 done, saved at 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (Ray, engines)
        proc.wait()
    before = _steps(run)
    assert sorted(before) == [1, 2, 3]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002"]
    assert before[2]["groups_in_flight"] > 0, "no partial rollout crossed the checkpoint"

    _run(_command(demo_model, run, "checkpoint.resume=auto"))
    after = _steps(run)
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]  # each once
    for key in COMPARED:  # step 3 again, from the checkpoint, equals step 3 of the uninterrupted run
        assert after[3][key] == pytest.approx(before[3][key], rel=1e-5, abs=1e-6), key
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002", "step_000004"]  # keep=2
