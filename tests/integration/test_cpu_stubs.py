"""The CPU stand-ins for CUDA-only packages import, and refuse (and record) any call."""
import os
import subprocess
import sys

from rollout.sglang import cpu as sglang_cpu


def test_stub_call_raises_and_is_recorded(tmp_path):
    log = tmp_path / "calls.log"
    code = (
        "import sgl_kernel, torchvision.transforms as T\n"
        "from sgl_kernel import fused_add_rmsnorm\n"
        "try:\n    fused_add_rmsnorm(1, 2)\nexcept NotImplementedError as e:\n    print('refused', e)\n"
        "print(type(T.InterpolationMode.BICUBIC).__name__)\n"
    )
    env = {"PYTHONPATH": sglang_cpu.STUBS_DIR, "TANDEM_CPU_STUB_LOG": str(log), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused sgl_kernel.fused_add_rmsnorm is a CPU stand-in" in proc.stdout
    assert log.read_text().split() == ["sgl_kernel.fused_add_rmsnorm"]


def test_stubs_are_not_visible_unless_applied():
    # a test that started SGLang on CPU in this process put the stand-ins on PYTHONPATH: leave them out
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != sglang_cpu.STUBS_DIR]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", "import sgl_kernel"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode != 0 and "No module named 'sgl_kernel'" in proc.stderr


def test_training_engine_process_never_gets_the_stubs(random_model, free_port):
    """Only the rollout process tree runs with the stand-ins; the trainer imports the real world."""
    code = (
        "import importlib.util, sys\n"
        "from rl.trainer.engine import TrainingEngine\n"
        f"TrainingEngine({random_model!r}, master_port={free_port}, device='cpu')\n"
        "print('stubs' if any('cpu_stubs' in p for p in sys.path) or importlib.util.find_spec('sgl_kernel') else 'clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "clean", proc.stderr[-2000:]
