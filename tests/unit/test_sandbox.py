"""The code sandbox against hostile programs (each contained and reported, and nothing left running),
and the code reward on top of it."""
import os
import socket
import subprocess
import time

import pytest

from rewards.builtin.code import code_tests, extract_code
from rewards.sandbox import REPO_ROOT, Limits, Sandbox, isolation_mode
from rl.sample import Sample

LIMITS = Limits(wall_s=6.0, cpu_s=2, memory_mb=256, processes=16, file_mb=1)


@pytest.fixture(scope="module")
def box():
    return Sandbox(LIMITS)


def _nobody_processes() -> int:
    out = subprocess.run(["pgrep", "-u", "nobody", "-c"], capture_output=True, text=True).stdout.strip()
    return int(out or 0)


def _settles_to_no_processes(timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _nobody_processes() == 0:
            return True
        time.sleep(0.2)
    return False


def test_this_machine_gets_namespaces(box):
    # CI and development machines run as root with util-linux: the strongest mode must be in use here
    assert isolation_mode() in ("namespaces", "userns") and box.mode == isolation_mode()
    assert box.network_isolated()


def test_a_well_behaved_program_runs_with_stdin_and_files(box):
    result = box.run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="2 3 4")
    assert result.status == "ok" and result.stdout == "9\n"


def test_an_infinite_loop_is_stopped_by_its_cpu_limit(box):
    result = box.run_python("while True:\n    pass")
    assert result.status == "cpu_time" and result.wall_s < LIMITS.wall_s


def test_a_sleeping_program_is_stopped_by_the_wall_clock(box):
    result = box.run_python("import time\ntime.sleep(60)", limits=Limits(wall_s=1.0))
    assert result.status == "timeout" and result.wall_s < 5


def test_a_fork_bomb_is_contained_and_leaves_nothing_behind(box):
    before = time.monotonic()
    result = box.run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status in ("timeout", "cpu_time", "killed")
    assert time.monotonic() - before < LIMITS.wall_s + 5
    assert _settles_to_no_processes(), "fork bomb processes outlived the sandbox"
    # and the machine answers: a fresh program runs normally right after
    assert box.run_python("print('alive')").stdout == "alive\n"


def test_a_memory_bomb_fails_with_memory_error(box):
    result = box.run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(2**24))")
    assert result.status == "memory", result


def test_output_beyond_the_file_size_limit_is_cut(box):
    result = box.run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert result.status == "file_size" and len(result.stdout) <= LIMITS.file_mb * 2**20


def test_a_network_connection_attempt_fails(box):
    with socket.socket() as server:  # a listener on this host: reachable from anywhere outside the sandbox
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = box.run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('in')")
    assert result.status == "error" and "in" not in result.stdout
    assert "OSError" in result.stderr or "Error" in result.stderr


def test_writing_outside_the_working_directory_reaches_nothing_on_the_host(box, tmp_path):
    targets = [os.path.join(REPO_ROOT, "sandbox_was_here"), "/tmp/tandem_sandbox_escape", str(tmp_path / "escape")]
    program = "\n".join(f"try:\n    open({t!r}, 'w').write('x')\n    print('wrote', {t!r})\nexcept OSError as e:\n"
                        f"    print('refused', {t!r}, type(e).__name__)" for t in targets)
    result = box.run_python(program + "\nopen('inside.txt', 'w').write('ok')\nprint('inside ok')")
    assert result.status == "ok" and "inside ok" in result.stdout
    for target in targets:
        assert not os.path.exists(target), f"the sandbox wrote {target} on the host"


def test_environment_secrets_and_project_files_are_out_of_reach(box, monkeypatch):
    monkeypatch.setenv("TANDEM_TEST_SECRET", "s3cr3t-token")
    program = ("import os\nprint(sorted(os.environ))\nprint('secret' if 's3cr3t' in str(os.environ) else 'clean')\n"
               f"print(os.path.exists({os.path.join(REPO_ROOT, 'README.md')!r}))\n"
               f"print(os.path.exists(os.path.expanduser('~') + '/.bashrc'))\nprint(os.getuid())")
    result = box.run_python(program)
    lines = result.stdout.splitlines()
    assert result.status == "ok" and lines[1] == "clean" and lines[2] == "False", result


def _code_sample(response, tests):
    return Sample(group_id=0, prompt="", prompt_ids=[1], reference="", response=response, metadata={"tests": tests})


def test_code_reward_runs_stdin_and_assert_tests_and_reports_each():
    script = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert extract_code(script) == "a, b = map(int, input().split())\nprint(a + b)\n"
    score, parts = code_tests(_code_sample(script, [{"input": "2 3", "output": "5"}, {"input": "1 1", "output": "3"}]),
                              wall_s=5, cpu_s=2)
    assert score == 0.5 and parts == {"test0": 1.0, "test1": 0.0, "status_ok": 2.0}  # a wrong output exits 0
    function = "```\ndef add(a, b):\n    return a + b\n```"
    score, parts = code_tests(_code_sample(function, ["assert add(2, 2) == 4", "assert add(1, 1) == 3"]), strict=True)
    assert score == 0.0 and parts == {"test0": 1.0, "test1": 0.0, "status_ok": 1.0, "status_error": 1.0}
    hostile = _code_sample("```python\nwhile True: pass\n```", ["assert True"])
    assert code_tests(hostile, wall_s=5, cpu_s=1) == (0.0, {"test0": 0.0, "status_cpu_time": 1.0})


def test_a_project_cloned_into_tmp_still_runs_programs():
    """A clone at /tmp/<name> has /tmp as its parent folder: covering it would hide the working directory."""
    box = Sandbox(LIMITS, hidden=("/tmp", "/var/tmp"))
    assert "/tmp" not in box.cover
    result = box.run_python("print(6 * 7)")
    assert result.status == "ok" and result.stdout == "42\n", result
