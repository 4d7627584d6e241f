"""Kernels built for sm_90a on a machine without a GPU, for the kernel tests' compile checks (their subprocesses
import this module: conftest.run_without_interpreter puts this folder on the path). Triton compiles for a GPUTarget
without a device; the ptxas it ships assembles the PTX and reports registers and spills; cuobjdump gives the SASS."""

import subprocess
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 64)


def compile_ptx(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int | None = None,
                divisible=(), gluon: bool = False) -> str:  # fmt: skip
    """`fn`'s PTX for sm_90, the arguments named in `divisible` specialised as 16-divisible (as a launch with such
    pointers and sizes would be); `gluon` for a @gluon.jit kernel."""
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    src = source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options=options).asm["ptx"]


def assemble(ptx: str, sass: bool = False) -> tuple[str, str]:
    """(ptxas -v's report, the SASS if asked, else "") of `ptx` assembled for sm_90a by the ptxas Triton runs."""
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-v", "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"]
        report = subprocess.run(cmd, capture_output=True, text=True).stderr
        if not sass:
            return report, ""
        return report, subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f"{d}/k.cubin"],
                                      capture_output=True, text=True).stdout  # fmt: skip


def spill_free(report: str) -> bool:
    return "0 bytes spill stores, 0 bytes spill loads" in report
