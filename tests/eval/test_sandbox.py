"""The sandbox: HumanEval's canonical solutions pass, wrong ones fail, and escapes fail."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from modeling_deepseek_v3.eval import sandbox
from modeling_deepseek_v3.eval.tasks.humaneval import build_program, load_problems

FAST = sandbox.Limits(timeout_s=3.0)
namespace_only = pytest.mark.skipif(sandbox.isolation_mode() != "namespace", reason="needs root and unshare")


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    problems = load_problems()
    assert len(problems) == 164
    programs = [build_program(p, p["canonical_solution"]) for p in problems]
    wrong = problems[0]  # has_close_elements: "always False" fails its asserts
    programs.append(build_program(wrong, "    return False\n"))
    runs = sandbox.run_many(programs, sandbox.Limits(timeout_s=20.0))
    failed = [(p["task_id"], r.stderr[-300:]) for p, r in zip(problems, runs, strict=False) if not r.passed]
    assert not failed, failed
    assert runs[-1].status == "failed" and "AssertionError" in runs[-1].stderr


@pytest.mark.parametrize("mode", ["namespace", "weak"])
def test_scratch_directory_is_writable(mode):
    if mode == "namespace" and sandbox.isolation_mode() != "namespace":
        pytest.skip("needs root and unshare")
    r = sandbox.run_python("open('f.txt', 'w').write('ok')\nprint(open('f.txt').read())", FAST, mode=mode)
    assert r.passed and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("mode", ["namespace", "weak"])
def test_writing_outside_the_scratch_directory_fails(mode, tmp_path):
    if mode == "namespace" and sandbox.isolation_mode() != "namespace":
        pytest.skip("needs root and unshare")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory must stay untouched
    targets = [tmp_path / f"escape-{uuid.uuid4().hex}", Path("/var/tmp") / f"dsv3-escape-{uuid.uuid4().hex}"]
    for target in targets:
        r = sandbox.run_python(f"open({str(target)!r}, 'w').write('pwned')", FAST, mode=mode)
        assert r.status == "failed"
        assert not target.exists()


@pytest.mark.parametrize("mode", ["namespace", "weak"])
def test_opening_a_socket_fails(mode):
    if mode == "namespace" and sandbox.isolation_mode() != "namespace":
        pytest.skip("needs root and unshare")
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\nprint('connected')"
    r = sandbox.run_python(code, FAST, mode=mode)
    assert r.status == "failed" and "connected" not in r.stdout


@pytest.mark.parametrize("mode", ["namespace", "weak"])
def test_infinite_loop_times_out(mode):
    if mode == "namespace" and sandbox.isolation_mode() != "namespace":
        pytest.skip("needs root and unshare")
    start = time.monotonic()
    r = sandbox.run_python("while True:\n    pass", sandbox.Limits(timeout_s=1.0), mode=mode)
    assert r.status == "timeout" and time.monotonic() - start < 5


@pytest.mark.parametrize("mode", ["namespace", "weak"])
def test_allocating_10_gb_fails(mode):
    if mode == "namespace" and sandbox.isolation_mode() != "namespace":
        pytest.skip("needs root and unshare")
    r = sandbox.run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", FAST, mode=mode)
    assert r.status == "failed" and "MemoryError" in r.stderr


@namespace_only
def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = sandbox.run_python(bomb, sandbox.Limits(timeout_s=2.0, max_processes=16))
    assert r.status == "timeout"
    # The pid namespace dies with its init; the kernel reaps the rest asynchronously, so poll for a while.
    deadline = time.monotonic() + 10
    while (leftovers := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers


def test_weak_mode_blocks_fork():
    # As root RLIMIT_NPROC is not enforced, so weak mode must refuse fork itself.
    r = sandbox.run_python("import os\nos.fork()\nprint('forked')", FAST, mode="weak")
    assert r.status == "failed" and "forked" not in r.stdout


def _sandbox_processes() -> list[Path]:
    def uid(proc: Path) -> int:
        try:
            return proc.stat().st_uid
        except FileNotFoundError:
            return -1

    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and uid(p) >= 100_000]
