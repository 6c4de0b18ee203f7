"""A sandbox for model-written programs: a separate process with limits, a fresh working directory, no
network, and no view of the project's files or the environment's secrets.

How (Linux, util-linux `unshare` and `setpriv`; the strongest mode the machine allows is picked once):
- "namespaces" (root, or unprivileged user namespaces, "userns"): new network, mount and PID namespaces.
  The network namespace has only a loopback device that is down, so no connection leaves it (checked
  by `network_isolated`, which has a program try to reach a listener on this host). In the mount
  namespace /tmp, /var/tmp and /dev/shm are fresh size-limited tmpfs, the working directory is bound at
  /tmp/work, and the project, its parent folder and $HOME are covered by empty tmpfs. As root the
  program then runs as the unprivileged user nobody (so the per-user process limit applies and the
  rest of the file system is read-only to it). A shell is PID 1 of the PID namespace and the program
  its child: when the program ends or is killed the shell exits with its status, and every process the
  program started dies with the namespace.
- "rlimits" (no namespaces available): resource limits, working directory and environment only; the
  network is NOT isolated (`network_isolated` says so and the code reward logs it).
Always: CPU seconds, address space, processes, file size (stdout and stderr go to files, so their size
is bounded too) set by `prlimit`; a wall-clock limit, after which the process group is killed; an
environment of PATH, HOME and LANG only; the system Python (`/usr/bin/python3`, run with -I), not the
project's virtual environment.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")  # fresh, size-limited in the sandbox

# Runs inside the new namespaces as root of them: set up the file system view, then start the program.
# $1 = whether to drop to nobody, $2 = tmpfs size (MiB), then the paths to cover, "--", the command.
_SETUP = r"""
set -e
drop=$1; size=$2; shift 2
mount --make-rprivate /
for d in {private_tmpfs}; do
  if [ -d "$d" ]; then mount -t tmpfs -o "size=${size}m,mode=1777" tmpfs "$d"; fi
done
mkdir /tmp/work
mount --no-canonicalize --bind . /tmp/work
cd /tmp/work
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mount -t tmpfs -o size=1m,mode=755 tmpfs "$1"; fi
  shift
done
shift
set +e
if [ "$drop" = 1 ]; then
  setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs -- "$@"
else
  "$@"
fi
exit $?
""".replace("{private_tmpfs}", " ".join(PRIVATE_TMPFS))


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space of each process
    processes: int = 32  # per user (nobody) in the namespaces mode
    file_mb: int = 16  # largest file written, stdout and stderr included
    tmpfs_mb: int = 64  # the private /tmp, /var/tmp and /dev/shm


@dataclass
class RunResult:
    status: str  # ok | error (exit code != 0) | timeout (wall) | cpu_time | memory | file_size | killed
    exit_code: Optional[int]
    stdout: str
    stderr: str
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def isolation_mode() -> str:
    """The strongest isolation this machine allows: namespaces (as root), userns, or rlimits."""
    probe = ["--net", "--mount", "--pid", "--fork", "--kill-child", "true"]
    if shutil.which("unshare") is None:
        return "rlimits"
    if os.geteuid() == 0 and shutil.which("setpriv") and _works(["unshare", *probe]):
        return "namespaces"
    if _works(["unshare", "--user", "--map-root-user", *probe]):
        return "userns"
    return "rlimits"


def _limits_prefix(limits: Limits) -> list[str]:
    """util-linux `prlimit` setting the limits every process of the program inherits. A command, not a
    `preexec_fn`: rewards run in threads, and running Python between fork and exec in a threaded process
    can deadlock."""
    return ["prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",  # SIGXCPU, then SIGKILL a second later
            f"--as={limits.memory_mb * 2**20}", f"--fsize={limits.file_mb * 2**20}", f"--nproc={limits.processes}",
            "--core=0", "--"]


def _status(code: int, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if code == 0:
        return "ok"
    signalled = -code if code < 0 else code - 128 if code > 128 else None  # killed by a signal, in the shell's terms
    if signalled == signal.SIGXCPU:
        return "cpu_time"
    if signalled == signal.SIGXFSZ or "File too large" in stderr:
        return "file_size"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    return "killed" if signalled is not None else "error"


@dataclass
class Sandbox:
    limits: Limits = field(default_factory=Limits)
    python: str = SYSTEM_PYTHON
    hidden: tuple[str, ...] = ()  # more paths to cover, besides the project, its parent and $HOME

    def __post_init__(self):
        self.mode = isolation_mode()
        home = os.path.expanduser("~")
        cover = [REPO_ROOT, os.path.dirname(REPO_ROOT), home, *self.hidden]
        # /tmp, /var/tmp and /dev/shm are fresh tmpfs in the sandbox already; covering one (a project
        # cloned straight into /tmp has it as its parent) would hide the working directory bound there
        self.cover = sorted({p for p in cover if p not in ("/", "", *PRIVATE_TMPFS)
                             and not self.python.startswith(p + "/")})
        if not os.access(self.python, os.X_OK):
            raise FileNotFoundError(f"sandbox: no Python interpreter at {self.python}")
        if shutil.which("prlimit") is None:
            raise FileNotFoundError("sandbox: needs util-linux's prlimit (apt install util-linux)")

    def _command(self, argv: list[str], limits: Limits) -> list[str]:
        if self.mode == "rlimits":
            return [*_limits_prefix(limits), *argv]
        prefix = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if self.mode == "userns":
            prefix[1:1] = ["--user", "--map-root-user"]
        drop = "1" if self.mode == "namespaces" else "0"
        return [*_limits_prefix(limits), *prefix, "sh", "-c", _SETUP, "sandbox", drop, str(limits.tmpfs_mb),
                *self.cover, "--", *argv]

    def run(self, argv: list[str], files: Optional[dict[str, str]] = None, stdin: str = "",
            limits: Optional[Limits] = None) -> RunResult:
        """Run `argv` in a fresh working directory holding `files` (name -> text)."""
        limits = limits or self.limits
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tandem-sandbox-") as root:
            work = os.path.join(root, "work")
            os.mkdir(work)
            for name, text in (files or {}).items():
                with open(os.path.join(work, name), "w") as f:
                    f.write(text)
            if self.mode == "namespaces":  # the program runs as nobody and writes only here
                for path in [work, *(os.path.join(work, n) for n in files or {})]:
                    os.chown(path, NOBODY, NOBODY)
            with open(os.path.join(root, "stdout"), "w+b") as out, open(os.path.join(root, "stderr"), "w+b") as err:
                env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/work" if self.mode != "rlimits" else work,
                       "LANG": "C.UTF-8"}
                proc = subprocess.Popen(self._command(argv, limits), cwd=work, env=env, stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, start_new_session=True)
                timed_out = False
                try:
                    proc.communicate(stdin.encode(), timeout=limits.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the program
                    except ProcessLookupError:
                        pass
                    proc.wait()
                texts = []
                for f in (out, err):
                    f.seek(0)
                    texts.append(f.read(limits.file_mb * 2**20).decode(errors="replace"))
        return RunResult(_status(proc.returncode, texts[1], timed_out), None if timed_out else proc.returncode,
                         texts[0], texts[1], time.perf_counter() - start)

    def run_python(self, code: str, stdin: str = "", limits: Optional[Limits] = None,
                   files: Optional[dict[str, str]] = None) -> RunResult:
        return self.run([self.python, "-I", "main.py"], {**(files or {}), "main.py": code}, stdin, limits)

    def network_isolated(self) -> bool:
        """Whether a sandboxed program fails to reach a TCP listener on this host (it must)."""
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            port = server.getsockname()[1]
            probe = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=3)\n"
                     "    print('connected')\nexcept OSError as e:\n    print('blocked', e)\n" % port)
            result = self.run_python(probe, limits=Limits(wall_s=10))
        return result.ok and result.stdout.startswith("blocked")
