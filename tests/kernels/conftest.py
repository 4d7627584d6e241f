"""FP8 kernel tests run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (it is read at import and at kernel
definition), so it is set here, at collection, before any test module imports the kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Relative Frobenius error ||out - ref|| / ||ref||, keyed by what is compared.
TOL = {
    # Same fp8 operands and scales as the reference; only the fp32 summation order differs.
    torch.float32: 1e-5,
    # bf16 output: RNE would be <= 2^-9 relative per element, but the interpreter's fp32->bf16
    # cast truncates (measured here), up to 2^-7 relative, RMS ~3.4e-3 over a matrix.
    torch.bfloat16: 6e-3,
    # Whole recipe vs an fp32 matmul: each operand rounded to e4m3 (3 mantissa bits, <= 2^-4
    # relative, RMS ~2^-4/sqrt(3)*0.72 ~ 0.026), two independent operands -> ~0.037; bound sqrt(2)*2^-4/sqrt(3).
    "e4m3_recipe": 0.051,
}


@pytest.fixture
def tol():
    return TOL


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture(autouse=True, scope="session")
def _interpretable_triton_stdlib():
    """triton.language's own @jit helpers (tl.cdiv, ...) made interpretable once per session, as every public kernel
    entry point does through require_fp8: tests that call a private launcher first (e.g. _grouped_launch) would
    otherwise fail when run alone, triton having been imported (by transformers) before TRITON_INTERPRET was set."""
    from modeling_deepseek_v3.kernels import _triton

    if _triton.HAS_TRITON:
        _triton._interpret_triton_stdlib()


def run_without_interpreter(code: str, *args: str, timeout: int = 300) -> None:
    """Run `code`, a script that prints "ok" last, in a fresh Python without TRITON_INTERPRET, for what the
    interpreter cannot do: compile for sm_90 (with sm90.py, importable there) and the GPU checks (this session's
    interpreter mode is fixed when triton is first imported). Skips where the Triton install has no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if "ptxas" in out.stderr and "No such file" in out.stderr:
        pytest.skip("this Triton ships no ptxas")
    assert out.stdout.strip().endswith("ok"), out.stdout[-1000:] + out.stderr[-3000:]


@pytest.fixture
def without_interpreter():
    return run_without_interpreter
