"""Triton import guard and the one place that decides whether the FP8 kernels can run here.

Importing the kernels package must work without Triton (CPU-only installs); only calling a
kernel then raises, with the reason.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

try:  # Triton is optional: `pip install deepseek-v3-hf[triton]`
    import triton
    import triton.language as tl

    HAS_TRITON, _TRITON_ERROR = True, ""
except Exception as e:  # ImportError, or a broken install raising something else at import
    triton, tl = None, None
    HAS_TRITON, _TRITON_ERROR = False, f"{type(e).__name__}: {e}"

import torch

# Gluon (triton.experimental.gluon) is experimental and changes between Triton releases (3.7 renamed the TMA
# copies; register allocation, hence spills, moves too). Our Gluon kernels were built and measured with Triton 3.6,
# the GPU machine's; with any other version the @triton.jit kernels serve (they compute the same function).
GLUON_VALIDATED_TRITON = "3.6."


def gluon_validated() -> bool:
    """Whether this Triton is the one the Gluon kernels were validated with (the Gluon modules check this once)."""
    return HAS_TRITON and triton.__version__.startswith(GLUON_VALIDATED_TRITON)


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter passes scalars as 1-element arrays and takes `int()` of them for a
    loop's `range(lo, hi)`; NumPy >= 2.4 refuses `int()` of a 1-D array, so every loop with run-time
    bounds fails under TRITON_INTERPRET=1. Re-point `__index__` at the single element."""
    try:
        import triton.runtime.interpreter as interp
    except Exception:
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_dsv3_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dsv3_patched = True
    interp._patch_lang_tensor = patched


def _patch_interpreter_device_calls() -> None:
    """Triton 3.6's interpreter, calling a @jit helper from a kernel (InterpretedFunction.__call__), swaps the
    helper's triton.language modules (e.g. tl.core, for tl.standard's cdiv) to interpreter builtins and never
    swaps them back; the kernel's own swap is undone at its end, the helper's stays. A kernel compiled for a GPU
    later in the same process (GPU tests after CPU ones) then builds from interpreter builtins and fails
    ("'block_argument' object has no attribute 'dtype'" in a Gluon kernel's gl.cdiv). Undo it on return."""
    if not triton.__version__.startswith("3.6."):  # the interpreter whose internals this replaces (seen and checked)
        return
    try:
        import triton.runtime.interpreter as interp
    except Exception:
        return
    call = interp.InterpretedFunction.__call__
    if getattr(call, "_dsv3_patched", False):
        return

    def device_call(self, *args, **kwargs):
        scope = interp._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e
        finally:
            scope.restore()  # back to the calling kernel's swap, which that kernel's GridExecutor undoes

    device_call._dsv3_patched = True
    interp.InterpretedFunction.__call__ = device_call


if HAS_TRITON:
    _patch_interpreter_for_numpy_2_4()
    _patch_interpreter_device_calls()


@functools.cache
def _interpret_triton_stdlib() -> None:
    """Make triton.language's own @jit helpers (the combine functions of tl.max, tl.sum, ...)
    interpretable when TRITON_INTERPRET=1 was set only after `import triton` (e.g. transformers
    imported it first): `@triton.jit` picks interpreter or compiler at decoration time, and a
    compiled-mode helper called from an interpreted kernel raises "Cannot call @triton.jit'd
    outside of the scope of a kernel"."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, InterpretedFunction] = {}  # one wrapper per helper: reduce() compares them by identity
    for mod in (tl, tl.standard, tl.core, tl.math):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                setattr(mod, name, wrapped.setdefault(id(obj), InterpretedFunction(obj.fn)))


@dataclass(frozen=True)
class Capabilities:
    triton: bool
    cuda: bool
    compute_capability: tuple[int, int] | None

    @property
    def fp8(self) -> bool:
        """Hardware e4m3 tensor cores: Ada (8.9) and Hopper (9.0) or newer."""
        return self.triton and self.cuda and self.compute_capability is not None and self.compute_capability >= (8, 9)


@functools.cache
def capabilities() -> Capabilities:
    """Detected once per process: Triton importable, CUDA available, compute capability of device 0."""
    cuda = torch.cuda.is_available()
    cc = torch.cuda.get_device_capability() if cuda else None
    return Capabilities(triton=HAS_TRITON, cuda=cuda, compute_capability=cc)


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU (read at call time: tests set it before launching)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_fp8(reason_prefix: str) -> None:
    """Raise a RuntimeError that says why the FP8 kernels cannot run here; return if they can."""
    caps = capabilities()
    if not caps.triton:
        raise RuntimeError(f"{reason_prefix}: FP8 kernels need Triton, which is not importable ({_TRITON_ERROR})")
    if interpreting():
        _interpret_triton_stdlib()
        return  # the interpreter runs every kernel on the CPU, fp8 types and tl.dot included
    if not caps.cuda:
        raise RuntimeError(
            f"{reason_prefix}: FP8 kernels need a CUDA GPU and none is available (set TRITON_INTERPRET=1 to run them on the CPU, slowly)"
        )
    if caps.compute_capability < (8, 9):
        major, minor = caps.compute_capability
        raise RuntimeError(
            f"{reason_prefix}: FP8 kernels need compute capability >= 8.9 (Ada/Hopper), this GPU has {major}.{minor}"
        )
