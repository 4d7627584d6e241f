"""The Gluon block-scaled FP8 GEMM (kernels/fp8_gemm_gluon.py) against the torch references.

GPU tests run only on compute capability 9.0 with Gluon importable; the conftest sets
TRITON_INTERPRET=1 for the Triton kernels, which does not touch Gluon kernels (gluon.jit always
compiles), so these call the Gluon launcher directly. Kernel and reference get the same e4m3
operands and scales; inputs are fresh random values (never zeros) and outputs start as NaN, so an
element the kernel never writes fails the test.

Tolerances (relative Frobenius error; the conftest's table is for the exact-fp32 interpreter):
  fp32 output: 5e-4 -- inside each 128-K step the tensor cores add the e4m3 products with a
                       reduced-precision accumulator (the reason for the recipe's promotion every
                       128, DeepSeek-V3 sec. 3.3.2), so even exact scales leave ~1e-4: 1.3-1.4e-4
                       measured on an H200 for this kernel at every shape tried.
  bf16 output: 4e-3 -- plus the round-to-nearest bf16 cast, <= 2^-9 relative per element (RMS
                       about 1.1e-3; 1.7e-3 measured at V3 shapes), with headroom.
The CPU tests check that the dispatcher falls back cleanly where Gluon cannot run, and compile the
wgrad configurations and the grouped (MoE) kernel for sm_90 (ptxas: no spills, the overlap intact).
The grouped kernel (launch_gluon_grouped) is checked against the references on the GPU below, through its
launcher and through fp8_grouped_gemm's dispatch.
"""

import importlib
import os

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import (  # noqa: E402
    fp8_gemm,
    fp8_gemm_dgrad,
    fp8_gemm_dgrad_ref,
    fp8_gemm_ref,
    fp8_gemm_wgrad,
    fp8_gemm_wgrad_ref,
    fp8_grouped_gemm,
    fp8_grouped_gemm_dgrad,
    fp8_grouped_gemm_dgrad_ref,
    fp8_grouped_gemm_ref,
    quantize_act_ref,
    quantize_act_t_ref,
    quantize_weight_ref,
)

# the package re-exports the function fp8_gemm, which shadows the submodule's name: import by path
G = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm")
GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")

TOL_GPU = {torch.float32: 5e-4, torch.bfloat16: 4e-3}


def _hopper() -> bool:
    return GL.HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def gpu_path(monkeypatch):
    # The conftest's TRITON_INTERPRET=1 (for the Triton kernels) would make can_use_gluon refuse.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def gpu(test):
    skip = pytest.mark.skipif(not _hopper(), reason="needs CUDA compute capability 9.0 and triton.experimental.gluon")
    return skip(pytest.mark.usefixtures("gpu_path")(test))


def _rand(*shape, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=device)
    return x * (1 + 10 * torch.rand(shape[-1], generator=g, device=device))  # scales differ per 128-block


def _nan_out(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device="cuda")


# (M, N, K): ragged M, N not a multiple of 128 (1000) or of the tile (2112 = 16.5 x 128), K ragged
# (1040: a zero-filled tail step) and long (7168: 56 steps, even; 1040: 9, odd; 2112: 17, odd).
# K = 1000 itself cannot use TMA (rows of 1000 bytes are not 16-byte aligned): see test_can_use_gluon.
FWD_SHAPES = [(777, 1000, 1040), (777, 2112, 7168), (256, 1000, 2112), (64, 128, 128)]


@gpu
@pytest.mark.parametrize("M,N,K", FWD_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(GL.DENSE_CONFIGS) if GL.HAS_GLUON else [None])
def test_forward_blockwise(M, N, K, out_dtype, config, rel):
    xq, xs = quantize_act_ref(_rand(M, K, seed=M + K))
    wq, ws = quantize_weight_ref(_rand(N, K, seed=N) * 0.02)
    y = GL.launch_gluon(xq, xs, wq, ws, True, out_dtype, config=config, out=_nan_out(M, N, out_dtype))
    assert not y.isnan().any()
    assert rel(y, fp8_gemm_ref(xq, xs, wq, ws, torch.float32)) < TOL_GPU[out_dtype]


@gpu
@pytest.mark.parametrize("M,N,K", [(777, 1040, 1000), (512, 2112, 7168)])
def test_dgrad(M, N, K, rel):
    """dx = dy W: the reduction runs over N, W transposed to N-major, the same 128x128 blocks."""
    dyq, dys = quantize_act_ref(_rand(M, N, seed=M + 1))
    wq, ws = quantize_weight_ref(_rand(N, K, seed=N + 1))
    wqt = wq.t().contiguous()
    dx = GL.launch_gluon(dyq, dys, wqt, ws.t().contiguous(), True, torch.float32, out=_nan_out(M, K, torch.float32))
    assert not dx.isnan().any()
    assert rel(dx, fp8_gemm_dgrad_ref(dyq, dys, wq, ws, torch.float32)) < TOL_GPU[torch.float32]


@gpu
@pytest.mark.parametrize("M,N,K", [(784, 1000, 2112), (4096, 2112, 1000)])  # M (the reduction) 16-aligned for TMA
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_wgrad_rowwise(M, N, K, out_dtype, rel):
    """dW = dy^T x: both operands scaled per row (128x1 tiles along tokens). Every configuration, the
    wgrad-only kernel options of GL.WGRAD_CONFIGS included (WARPS_N = 2, B_COLS; also compiled on the CPU by
    test_wgrad_configs_compile_for_sm90_without_spills). M = 784: 7 K-steps (odd
    tail), 4096: 32 (even); dW is N x K: N = 1000 ragged rows, K = 1000 ragged 64- and 128-column tiles."""
    dyTq, dyTs = quantize_act_t_ref(_rand(M, N, seed=M + 2))
    xTq, xTs = quantize_act_t_ref(_rand(M, K, seed=K + 2))
    assert set(GL.WGRAD_CONFIGS) <= set(GL.DENSE_CONFIGS)
    for config in GL.DENSE_CONFIGS:
        dw = GL.launch_gluon(dyTq, dyTs, xTq, xTs, False, out_dtype, config=config, out=_nan_out(N, K, out_dtype))
        assert not dw.isnan().any()
        assert rel(dw, fp8_gemm_wgrad_ref(dyTq, dyTs, xTq, xTs)) < TOL_GPU[out_dtype], config


@gpu
def test_can_use_gluon(monkeypatch):
    """TMA needs 16-byte aligned rows: K = 1000 fp8 (1000 bytes) is refused, K = 1040 accepted."""
    a = torch.empty(777, 1040, device="cuda", dtype=torch.float8_e4m3fn)
    assert GL.can_use_gluon(a, a)
    assert not GL.can_use_gluon(a[:, :1000].contiguous(), a)
    assert not GL.can_use_gluon(a[:, 1:])  # base not 16-byte aligned
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not GL.can_use_gluon(a, a)


@gpu
def test_launch_dispatches_to_gluon(rel):
    """fp8_gemm / fp8_gemm_dgrad on Hopper with 128x128 weight blocks, and fp8_gemm_wgrad with enough output tiles,
    run the Gluon kernel (bit-equal to calling it directly: the kernel is deterministic) and match the reference."""
    M = GL.GLUON_MIN_M
    xq, xs = quantize_act_ref(_rand(M, 1024, seed=11))
    wq, ws = quantize_weight_ref(_rand(768, 1024, seed=12))
    assert GL.gluon_config(M, 768, 1024, True, torch.bfloat16) is not None
    y = fp8_gemm(xq, xs, wq, ws, torch.float32)
    assert torch.equal(y, GL.launch_gluon(xq, xs, wq, ws, True, torch.float32, config=GL.DEFAULT_CONFIG))
    assert rel(y, fp8_gemm_ref(xq, xs, wq, ws, torch.float32)) < TOL_GPU[torch.float32]
    dyq, dys = quantize_act_ref(_rand(M, 768, seed=13))
    dx = fp8_gemm_dgrad(dyq, dys, wq, ws, torch.bfloat16)
    assert rel(dx, fp8_gemm_dgrad_ref(dyq, dys, wq, ws, torch.float32)) < TOL_GPU[torch.bfloat16]
    # the wgrad from GLUON_WGRAD_MIN_TILES output tiles (here 16 x 16 over 640 tokens: 5 steps, an odd count)
    dyTq, dyTs = quantize_act_t_ref(_rand(640, 2048, seed=14))
    xTq, xTs = quantize_act_t_ref(_rand(640, 2000, seed=15))
    assert GL.gluon_config(2048, 2000, 640, False, torch.float32) == GL.WGRAD_DEFAULT_CONFIG
    dw = fp8_gemm_wgrad(dyTq, dyTs, xTq, xTs, torch.float32)
    assert torch.equal(dw, GL.launch_gluon(dyTq, dyTs, xTq, xTs, False, torch.float32, config=GL.WGRAD_DEFAULT_CONFIG))
    assert rel(dw, fp8_gemm_wgrad_ref(dyTq, dyTs, xTq, xTs)) < TOL_GPU[torch.float32]


def test_gluon_policy():
    """Gluon only where it was measured faster: 128x128-blocked B (forward, dgrad), M >= GLUON_MIN_M; the wgrad (B
    per row) from GLUON_WGRAD_MIN_TILES output tiles, whatever the token count; the same for the grouped kernel's
    routed rows."""
    assert GL.gluon_config(4096, 7168, 2048, True, torch.bfloat16) == GL.DEFAULT_CONFIG
    assert GL.gluon_config(4096, 7168, 2048, True, torch.float32) == GL.DEFAULT_CONFIG
    assert GL.gluon_config(7168, 2048, 4096, False, torch.float32) == GL.WGRAD_DEFAULT_CONFIG  # dW 56 x 16 tiles
    assert GL.gluon_config(2048, 1024, 16384, False, torch.bfloat16) is None  # 16 x 8 tiles: split-K's
    assert GL.gluon_config(1024, 4096, 16384, False, torch.bfloat16) == GL.WGRAD_DEFAULT_CONFIG  # 8 x 32
    assert GL.gluon_config(7168, 2048, 4096, False, torch.float16) is None
    assert GL.gluon_config(GL.GLUON_MIN_M - 1, 7168, 2048, True, torch.bfloat16) is None
    assert GL.gluon_grouped_config(65536, torch.bfloat16) == GL.GROUPED_DEFAULT_CONFIG
    assert GL.gluon_grouped_config(GL.GLUON_MIN_M - 1, torch.bfloat16) is None
    assert GL.gluon_grouped_config(65536, torch.float16) is None


@gpu
def test_grouped_dispatches_to_gluon(monkeypatch, rel):
    """fp8_grouped_gemm / _dgrad from GLUON_MIN_M routed rows run launch_gluon_grouped (counted through a
    wrapper) and match the reference (fewer rows keep the Triton kernel: test_gluon_policy)."""
    calls = []
    launch = GL.launch_gluon_grouped
    monkeypatch.setattr(GL, "launch_gluon_grouped", lambda *a, **k: calls.append(k["config"]) or launch(*a, **k))
    offs = _routing(31, S=GL.GLUON_MIN_M + 77, E=12, empty=(4,))
    S, E = int(offs[-1]), offs.numel()
    xq, xs = quantize_act_ref(_rand(S, 384, seed=32))
    wq, ws = quantize_weight_ref(_rand(E, 256, 384, seed=33) * 0.02)
    y = fp8_grouped_gemm(xq, xs, wq, ws, offs, torch.float32)
    assert calls == [GL.GROUPED_DEFAULT_CONFIG]
    assert rel(y, fp8_grouped_gemm_ref(xq, xs, wq, ws, offs, torch.float32)) < TOL_GPU[torch.float32]
    dyq, dys = quantize_act_ref(_rand(S, 256, seed=34))
    dx = fp8_grouped_gemm_dgrad(dyq, dys, wq, ws, offs, torch.bfloat16)
    assert len(calls) == 2
    assert rel(dx, fp8_grouped_gemm_dgrad_ref(dyq, dys, wq, ws, offs, torch.float32)) < TOL_GPU[torch.bfloat16]


def test_interpreter_leaves_triton_language_as_it_was():
    """An interpreted kernel whose @jit helpers call triton.language's own (the grouped GEMM's tl.cdiv, the
    quantiser's tl.max) leaves tl, tl.core and tl.math as it found them (kernels._triton patches Triton 3.6's
    interpreter to undo a helper's swap): GPU kernels compiled later in the same process, as in a full test
    run on a GPU machine, must not be built from interpreter builtins."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not getattr(InterpretedFunction.__call__, "_dsv3_patched", False):
        pytest.skip("kernels._triton patches Triton 3.6's interpreter only (the version seen and checked)")

    def state():
        return {(m.__name__, k): v for m in (tl, tl.core, tl.math) for k, v in vars(m).items()}

    importlib.import_module("modeling_deepseek_v3.kernels._triton")._interpret_triton_stdlib()  # the one-time setup
    before = state()
    xq, xs = quantize_act_ref(_rand(300, 256, seed=3, device="cpu"))
    wq, ws = quantize_weight_ref(_rand(4, 128, 256, seed=4, device="cpu"))
    fp8_grouped_gemm(xq, xs, wq, ws, torch.tensor([10, 100, 200, 300], dtype=torch.int32), torch.float32)
    after = state()
    changed = [k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)]
    assert not changed, changed[:10]


def test_dispatch_falls_back_without_gluon(monkeypatch, tol, rel):
    """On the CPU (interpreter) can_use_gluon is False for every reason it checks, and _launch runs the
    Triton kernels: with Gluon reported unavailable, with the interpreter on, and for CPU tensors."""
    xq, xs = quantize_act_ref(_rand(48, 256, seed=5, device="cpu"))
    wq, ws = quantize_weight_ref(_rand(200, 256, seed=6, device="cpu"))
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert not GL.can_use_gluon(xq, wq)  # interpreting, and CPU tensors
    monkeypatch.setattr(GL, "HAS_GLUON", False)
    assert not GL.can_use_gluon(xq, wq)
    y = fp8_gemm(xq, xs, wq, ws, torch.float32)  # -> _launch, through require_fp8's interpreter setup
    assert rel(y, fp8_gemm_ref(xq, xs, wq, ws, torch.float32)) < tol[torch.float32]


_SASS_CHECK = """
import re
import sys

import sm90
import torch
from modeling_deepseek_v3.kernels import fp8_gemm_gluon as GL

bad = []
mode = sys.argv[1]
for config in sys.argv[2:]:
    for out_dtype in (torch.float32, torch.bfloat16):
        if mode == "wgrad":
            ck = GL.compile_sm90(config, False, out_dtype)  # B scaled per row: the wgrad path
        elif mode == "grouped_wgrad":
            ck = GL.compile_sm90_grouped_wgrad(config, out_dtype)  # the experts' wgrad, scales by TMA
        else:
            ck = GL.compile_sm90_grouped(config, out_dtype)  # the grouped (MoE) kernel, B in 128x128 blocks
        ptx, tag = ck.asm["ptx"], (mode, config, str(out_dtype))
        v, sass = sm90.assemble(ptx, sass=True)  # the same ptxas Triton ran: spills and warnings (C7514: wgmma serialized)
        if "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" not in v:
            bad.append((tag, "spills", [l.strip() for l in v.splitlines() if "spill" in l or "stack" in l]))
        if "C7514" in v or "serializ" in v:
            bad.append((tag, "ptxas serializes wgmma", v[-800:]))
        if re.search(r"\\b(STL|LDL)\\b", sass):
            bad.append((tag, "local-memory traffic in SASS"))
        if "QGMMA" not in sass:
            bad.append((tag, "no QGMMA (wgmma) in SASS"))
        # the overlap: retire step k with step k+1 still in flight, then promote on the CUDA cores
        if ptx.count("wgmma.wait_group.sync.aligned 1;") < 2 or sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x1") < 2:
            bad.append((tag, "no wait-for-all-but-one (wgmma.wait_group 1 / DEPBAR.LE gsb0, 0x1)"))
        if not re.search(r"WARPGROUP\\.DEPBAR\\.LE gsb0, 0x1 ;(?:(?!QGMMA).)*?\\bFFMA\\b", sass, re.S):
            bad.append((tag, "no FFMA between the partial wait and the next wgmma"))
        if mode == "grouped_wgrad":
            # The producer loads both ends of its item's token range (the expert's offsets) in every work item, ahead
            # of its K loop (the loop issuing the TMA loads): Triton 3.6 once kept only the first item's end, so the
            # K loop ran the first expert's step count for all (_grouped_wgrad_producer).
            ir = ck.asm["ttgir"]
            loops = list(re.finditer(r"scf\\.for %\\S+ = \\S+ to \\S+ step", ir))
            k_loops = [(outer, inner) for outer, inner in zip(loops, loops[1:])
                       if "async_tma_copy_global_to_local" in ir[inner.end():inner.end() + 3000].split("scf.for")[0]]
            if len(k_loops) != 1 or ir[k_loops[0][0].end():k_loops[0][1].start()].count("tt.load") != 2:
                bad.append((tag, "the producer does not load its expert's two offsets in every work item"))
        # grouped epilogue: the TMA store for full tiles, masked 16-byte stores for an expert's last tile
        if mode == "grouped" and ("cp.async.bulk.tensor.2d.global.shared" not in ptx or "st.global.v4" not in ptx):
            bad.append((tag, "grouped epilogue: no TMA store or no masked vector store"))
assert not bad, bad
print("ok")
"""


def _run_sass_check(without_interpreter, mode: str, *configs: str) -> None:
    """_SASS_CHECK in a subprocess (the conftest's TRITON_INTERPRET=1 breaks Gluon compiles) for `mode`'s kernel."""
    if not GL.HAS_GLUON:
        pytest.skip("no Gluon kernels for this Triton (validated: kernels._triton.GLUON_VALIDATED_TRITON)")
    without_interpreter(_SASS_CHECK, mode, *configs)


def test_wgrad_configs_compile_for_sm90_without_spills(without_interpreter):
    """The wgrad candidates (B scaled per row, a column-scale vector a step) compiled for sm_90 on the CPU,
    as launch_gluon would build them (same constexprs, num_warps, maxnreg, setmaxnreg split): ptxas
    reports no spill and no C7514 (wgmma serialized), the SASS has QGMMA, no local memory, and the
    partial-overlap wait (wgmma.wait_group 1 / WARPGROUP.DEPBAR.LE gsb0, 0x1) followed by the promotion
    FFMAs before the next wgmma. Speed and results are for the GPU tests/benchmark (test_wgrad_rowwise
    runs every GLUON_CONFIGS entry)."""
    assert set(GL.WGRAD_CONFIGS) <= set(GL.GLUON_CONFIGS)
    _run_sass_check(without_interpreter, "wgrad", *GL.WGRAD_CONFIGS)


def test_grouped_configs_compile_for_sm90_without_spills(without_interpreter):
    """The grouped (MoE) kernel compiled for sm_90 on the CPU for every GROUPED_CONFIGS entry, fp32 and bf16
    out, as launch_gluon_grouped would build it: the same checks as the wgrad test above (no spills, no
    C7514, QGMMA, wgmma.wait_group 1 / DEPBAR.LE gsb0, 0x1 followed by the promotion FFMAs), plus both
    epilogue paths (TMA store, masked st.global.v4) present. Numbers: the GPU tests below."""
    assert set(GL.GROUPED_CONFIGS) <= set(GL.GLUON_CONFIGS)
    _run_sass_check(without_interpreter, "grouped", *GL.GROUPED_CONFIGS)


def test_grouped_wgrad_compiles_for_sm90_without_spills(without_interpreter):
    """The experts' Gluon wgrad (launch_gluon_grouped_wgrad) compiled for sm_90 on the CPU, fp32 and bf16 out: the
    wgrad test's checks, and its producer loading each work item's token range (a Triton 3.6 miscompile once kept
    the first item's, which stalled the ring on the GPU wherever an expert's step count changed). Numbers: the
    GPU test in test_fp8_grouped_gemm.py."""
    _run_sass_check(without_interpreter, "grouped_wgrad", GL.WGRAD_DEFAULT_CONFIG)


# ---------------------------------------------------------------------------------------------
# Grouped (MoE) kernel: launch_gluon_grouped against fp8_grouped_gemm_ref / _dgrad_ref.


def _routing(seed, S=None, E=None, empty=(), counts=None):
    """offs_E (int32, CUDA): explicit per-expert counts, or S rows routed uniformly at random over the E
    experts not in `empty` (ragged counts; the `empty` experts get zero rows)."""
    if counts is None:
        g = torch.Generator().manual_seed(seed)
        allowed = torch.tensor([e for e in range(E) if e not in empty])
        choice = allowed[torch.randint(len(allowed), (S,), generator=g)]
        counts = torch.bincount(choice, minlength=E)
    return torch.as_tensor(counts).cumsum(0).to(torch.int32).cuda()


# Routings: random over 8 experts with the first, a middle and the last empty; random over 32 experts
# (S = 4099: ~128 rows an expert, tiles ending anywhere); counts on the 64/128-row tile edges (0, 1, 63,
# 64, 65, 127, 128, 129, 300) around empty experts; one expert only; all rows in the last of three.
ROUTINGS = {
    "rand8": dict(S=1000, E=8, empty=(0, 3, 7)),
    "rand32": dict(S=4099, E=32, empty=(5,)),
    "edges": dict(counts=[0, 1, 127, 128, 129, 0, 300, 64, 63, 65, 0]),
    "one": dict(counts=[77]),
    "last": dict(counts=[0, 0, 200]),
}
# (N, K) of the forward: ragged N (1000: the last N tile reads the next expert's weight rows, masked at the
# store), N = 16.5 x 128 with a long K (56 steps, even), K ragged (1040: a zero-filled tail step, 9 steps,
# odd) and 17 steps (2112, odd).
GROUPED_SHAPES = [(1000, 1040), (2112, 7168), (256, 2112)]


def _check_grouped_configs(a, a_s, w, w_s, offs, out_dtype, ref, rel):
    """launch_gluon_grouped in every GROUPED_CONFIGS entry against `ref`, into a NaN-poisoned output: every routed
    element written, none left NaN, within the output dtype's tolerance; the two-consumer kernel (128x128h2, whose
    second half skips an expert's rows that are all padding) bit for bit as the cooperative one (128x128s4)."""
    ys = {}
    for config in GL.GROUPED_CONFIGS:
        y = ys[config] = GL.launch_gluon_grouped(a, a_s, w, w_s, offs, out_dtype, config=config,
                                                 out=_nan_out(a.shape[0], w.shape[1], out_dtype))  # fmt: skip
        assert not y.isnan().any(), config
        assert rel(y, ref) < TOL_GPU[out_dtype], config
    assert torch.equal(ys["128x128h2"], ys["128x128s4"])


@gpu
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("N,K", GROUPED_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_forward(routing, N, K, out_dtype, rel):
    """y = x W[e]^T per expert, every GROUPED_CONFIGS entry, output NaN-poisoned (all rows are routed:
    offs_E[-1] = S, so every element must be written; a tile's rows past its expert's end must not be)."""
    offs = _routing(N + K, **ROUTINGS[routing])
    S, E = int(offs[-1]), offs.numel()
    xq, xs = quantize_act_ref(_rand(S, K, seed=S + K))
    wq, ws = quantize_weight_ref(_rand(E, N, K, seed=N + E) * 0.02)
    ref = fp8_grouped_gemm_ref(xq, xs, wq, ws, offs, torch.float32)
    _check_grouped_configs(xq, xs, wq, ws, offs, out_dtype, ref, rel)


@gpu
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("N,K", [(1040, 1000), (2112, 7168)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_dgrad(routing, N, K, out_dtype, rel):
    """dx = dy W[e] per expert: the same kernel on the K-major weight copy [E, K, N] with the transposed
    scales (as fp8_grouped_gemm_dgrad calls the Triton kernel); K = 1000: ragged output columns."""
    offs = _routing(N + K + 1, **ROUTINGS[routing])
    S, E = int(offs[-1]), offs.numel()
    dyq, dys = quantize_act_ref(_rand(S, N, seed=S + N + 1))
    wq, ws = quantize_weight_ref(_rand(E, N, K, seed=K + E) * 0.02)
    wqt, wst = wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()
    ref = fp8_grouped_gemm_dgrad_ref(dyq, dys, wq, ws, offs, torch.float32)
    _check_grouped_configs(dyq, dys, wqt, wst, offs, out_dtype, ref, rel)


@gpu
def test_grouped_rows_past_last_expert_untouched():
    """Rows past offs_E[-1] belong to no expert: left as they were (NaN here), the rest written."""
    offs = _routing(0, counts=[0, 130, 5, 0])
    S, N, K = 200, 256, 256
    xq, xs = quantize_act_ref(_rand(S, K, seed=21))
    wq, ws = quantize_weight_ref(_rand(4, N, K, seed=22) * 0.02)
    y = GL.launch_gluon_grouped(xq, xs, wq, ws, offs, torch.float32, out=_nan_out(S, N, torch.float32))
    assert not y[:135].isnan().any() and y[135:].isnan().all()


def test_grouped_launcher_refuses_cpu():
    """Where Gluon cannot run (here: interpreter, CPU tensors) the launcher raises instead of launching."""
    if not GL.HAS_GLUON:
        pytest.skip("no Gluon kernels for this Triton (validated: kernels._triton.GLUON_VALIDATED_TRITON)")
    xq, xs = quantize_act_ref(_rand(40, 256, seed=7, device="cpu"))
    wq, ws = quantize_weight_ref(_rand(2, 128, 256, seed=8, device="cpu"))
    with pytest.raises(ValueError):
        GL.launch_gluon_grouped(xq, xs, wq, ws, torch.tensor([10, 40], dtype=torch.int32), torch.float32)
