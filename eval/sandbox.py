"""Run untrusted generated Python (HumanEval completions) with real limits.

What is enforced, by mode (the mode goes into every result JSON that used the sandbox):

"namespace" (root and util-linux `unshare` present, the normal case on our machines):
  - no network: a fresh network namespace (`unshare --net`) holds only a down loopback;
  - filesystem: in a private mount namespace every real filesystem is remounted read-only, and the only writable
    place is a fresh tmpfs on /tmp (the scratch cwd, `scratch_bytes` big) that vanishes with the namespace;
  - identity: the program runs as an unprivileged uid (100000 + the worker's pid, no groups), so it can't write
    root-owned files even through a mount we missed, nor signal anything outside the sandbox;
  - processes: RLIMIT_NPROC (enforced because the uid is not root) and a pid namespace, so that killing its init on
    timeout kills every process the program left (fork bombs included);
  - memory RLIMIT_AS, file size RLIMIT_FSIZE, no core files, wall-clock timeout.
"weak" (not root, or no `unshare`): a subprocess in a temporary cwd with the same rlimits and timeout, plus a
  Python audit hook that refuses sockets, fork/exec/spawn and opening files for writing outside the cwd. Audit hooks
  are a guard rail, not a boundary: ctypes can get around them. The timeout kills the process group only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

BOOT = Path(__file__).with_name("_sandbox_boot.py")
OUTPUT_TAIL = 4096  # bytes of stdout/stderr kept per run

# Prepended in weak mode only. Refuses the events that a namespace would block; see the module docstring for limits.
_WEAK_GUARD = r"""
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
def _guard(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.fork", "os.forkpty",
                 "os.posix_spawn", "os.exec", "os.spawn", "os.system", "subprocess.Popen", "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes)) and args[1] and any(c in str(args[1]) for c in "wax+"):
        path = _os.path.realpath(_os.fsdecode(args[0]))
        if path != "/dev/null" and not path.startswith(_ROOT + _os.sep):
            raise PermissionError(f"sandbox: writing {path} outside the scratch directory is not allowed")
    if event in ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod", "os.truncate"):
        path = _os.path.realpath(_os.fsdecode(args[0])) if isinstance(args[0], (str, bytes)) else ""
        if not path.startswith(_ROOT + _os.sep):
            raise PermissionError(f"sandbox: {event} outside the scratch directory is not allowed")
_sys.addaudithook(_guard)
del _guard
"""


@dataclass(frozen=True)
class Limits:
    """Per-run limits; the defaults suit HumanEval (the slowest canonical test takes well under a second)."""

    timeout_s: float = 10.0
    memory_bytes: int = 2 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    scratch_bytes: int = 64 << 20


@dataclass
class RunResult:
    """Outcome of one program: status is "passed" (exit 0), "failed" or "timeout"."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@cache
def isolation_mode() -> str:
    """ "namespace" when a probe run inside unshare works, else "weak"; probed once per process."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "weak"
    probe = _run(
        _boot_command(), json.dumps({"code": "pass", "uid": _sandbox_uid(), "limits": asdict(Limits())}), Limits()
    )
    return "namespace" if probe.passed else "weak"


def isolation_report(limits: Limits = Limits()) -> dict:
    """What the sandbox enforced, for result JSONs."""
    mode = isolation_mode()
    if mode == "namespace":
        enforced = [
            "network namespace (no network)",
            "read-only filesystems + private tmpfs scratch",
            "unprivileged uid",
            "pid namespace",
            "RLIMIT_AS",
            "RLIMIT_NPROC",
            "RLIMIT_FSIZE",
            "timeout",
        ]
    else:
        enforced = [
            "temporary cwd",
            "RLIMIT_AS",
            "RLIMIT_FSIZE",
            "timeout",
            "audit-hook guard on sockets, fork/exec, writes outside cwd (bypassable via ctypes)",
        ]
    return {"mode": mode, "enforced": enforced, "limits": asdict(limits)}


def run_python(code: str, limits: Limits = Limits(), mode: str | None = None) -> RunResult:
    """Run `code` as a Python program in the sandbox; `mode` forces "namespace" or "weak" (tests)."""
    mode = mode or isolation_mode()
    if mode == "namespace":
        job = json.dumps({"code": code, "uid": _sandbox_uid(), "limits": asdict(limits)})
        return _run(_boot_command(), job, limits)
    if mode != "weak":
        raise ValueError(f"unknown sandbox mode {mode!r}")
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as scratch:
        Path(scratch, "program.py").write_text(_WEAK_GUARD + code)
        return _run(
            [sys.executable, "-I", "program.py"], None, limits, cwd=scratch, preexec=lambda: _set_limits(limits)
        )


def run_many(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[RunResult]:
    """Run programs concurrently; threads suffice because each run is its own process and threads only wait."""
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda code: run_python(code, limits), programs))


def _sandbox_uid() -> int:
    # One uid per worker thread's run keeps RLIMIT_NPROC accounting (per uid) from leaking between concurrent runs.
    return 100_000 + (os.getpid() * 64 + _thread_slot()) % 1_000_000


def _thread_slot() -> int:
    import threading

    return threading.get_ident() % 64


def _boot_command() -> list[str]:
    return [
        "unshare",
        "--net",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        sys.executable,
        "-I",
        str(BOOT),
    ]


def _set_limits(limits: Limits) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run(cmd: list[str], stdin: str | None, limits: Limits, cwd: str | None = None, preexec=None) -> RunResult:
    # Output goes to files, not pipes: a program printing in a loop can't fill our memory, and RLIMIT_FSIZE caps it.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, preexec_fn=preexec, start_new_session=True
        )
        try:
            proc.communicate(stdin.encode() if stdin is not None else None, timeout=limits.timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            # The whole group: in namespace mode unshare dies, --kill-child kills the pid namespace's init, and the
            # kernel then kills everything left in that namespace.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        return RunResult(
            status, proc.returncode if status != "timeout" else None, time.monotonic() - start, _tail(out), _tail(err)
        )


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - OUTPUT_TAIL))
    return f.read().decode(errors="replace")
