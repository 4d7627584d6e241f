"""Quantisation kernels vs torch references: e4m3 codes and scales compared bit for bit.

The interpreter's own float->fp8 cast is wrong when rounding carries into the next power of two
(127.9 -> 64). The kernels do not use it for rounding: `_round_e4m3` rounds by exact RNE
arithmetic, then casts an exactly representable value. So these tests compare codes *exactly*
(no tolerance), which a kernel bug cannot hide behind; `test_interpreter_cast_bug_is_real` shows
the bare cast would fail them, only at the carry values.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from modeling_deepseek_v3.kernels import _triton as kt  # noqa: E402
from modeling_deepseek_v3.kernels import (  # noqa: E402
    capabilities,
    dequantize_weight,
    dequantize_weight_ref,
    quantize_act,
    quantize_act_ref,
    quantize_act_t,
    quantize_act_t_ref,
    quantize_weight,
    quantize_weight_ref,
    require_fp8,
)

CARRY = [127.9, -127.9, 15.99, 447.9, 0.2499, 1.0 / 512 * 0.6, -1.0 / 512 * 0.4]  # carries, subnormals, -0


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-1])  # tiles of very different range
    flat = x.view(-1)
    flat[: len(CARRY)] = torch.tensor(CARRY)[: flat.numel()]
    return x.to(dtype)


def _codes(y):
    return y.view(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (130, 576), (33, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act(shape, dtype, pow2):
    x = _inputs(shape, dtype, seed=hash((shape, pow2)) % 1000)
    y, s = quantize_act(x, pow2)
    y_ref, s_ref = quantize_act_ref(x, pow2)
    assert s.shape == (shape[0], triton.cdiv(shape[1], 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(_codes(y), _codes(y_ref))


@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (130, 200), (257, 5), (777, 1000)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act_t(shape, pow2):
    x = _inputs(shape, torch.bfloat16, seed=shape[0])
    y, s = quantize_act_t(x, pow2)
    y_ref, s_ref = quantize_act_t_ref(x, pow2)
    assert y.shape == (shape[1], shape[0]) and s.shape == (shape[1], triton.cdiv(shape[0], 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(_codes(y), _codes(y_ref))


@pytest.mark.parametrize("shape", [(576, 300), (200, 128), (3, 200, 300), (1, 7)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_weight(shape, pow2):
    w = _inputs(shape, torch.bfloat16, seed=len(shape))
    y, s = quantize_weight(w, pow2)
    y_ref, s_ref = quantize_weight_ref(w, pow2)
    # Official checkpoint layout: [ceil(N/128), ceil(K/128)] fp32 (per expert when stacked).
    assert s.shape == (*shape[:-2], triton.cdiv(shape[-2], 128), triton.cdiv(shape[-1], 128))
    assert s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(_codes(y), _codes(y_ref))


@pytest.mark.parametrize("shape", [(130, 200), (7, 300)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act_both_is_both(shape, pow2):
    """Both tilings (the two kernels FP8Linear launches for its input and its gradient): each equal, bit for bit,
    to its reference."""
    from modeling_deepseek_v3.kernels.quant import quantize_act_both

    x = _inputs(shape, torch.bfloat16, seed=shape[0] + pow2)
    y_ref, s_ref = quantize_act_ref(x, pow2)
    yt_ref, st_ref = quantize_act_t_ref(x, pow2)
    y, s, yt, st = quantize_act_both(x, pow2)
    assert torch.equal(s, s_ref) and torch.equal(_codes(y), _codes(y_ref))
    assert torch.equal(st, st_ref) and torch.equal(_codes(yt), _codes(yt_ref))


def _gathered(x, rows, row_scale):
    """X as the quantisers' rows/row_scale define it, materialised the way the model would: x[rows] * scale, a
    row of zeros where rows holds -1 (padding)."""
    X = x if rows is None else torch.where((rows >= 0)[:, None], x[rows.clamp(min=0)], 0.0).to(x.dtype)
    return X if row_scale is None else X * row_scale[:, None]


@pytest.mark.parametrize("T, M, K", [(37, 300, 200), (5, 129, 128), (130, 7, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["rows", "rows+scale", "scale", "rows+pad", "rows+scale+pad"])
def test_quantize_act_gathers_rows(T, M, K, dtype, how):
    """rows / row_scale (the routed experts' input x[token] and output gradient dout[token] * weight): both tilings
    equal, bit for bit, the references on X materialised by torch, the bf16 product rounded like torch's. The
    rows repeat and skip tokens, M is ragged, and scaled rows get bf16 products near rounding ties (random
    weights in (0, 1)); "pad": about a third of the rows are -1, padding rows of zeros (a whole 128-row tile of
    them where M allows)."""
    from modeling_deepseek_v3.kernels.quant import quantize_act_both

    x = _inputs((T, K), dtype, seed=T + M)
    g = torch.Generator().manual_seed(M)
    rows = torch.randint(0, T, (M,), generator=g) if "rows" in how else None
    if rows is not None and how == "rows+scale":
        rows = rows.int()  # both index dtypes
    if "pad" in how:
        rows[torch.rand(M, generator=g) < 0.3] = -1
        rows[128:256] = -1
    n = M if rows is not None else T
    row_scale = torch.rand(n, generator=g).to(dtype) if "scale" in how else None
    X = _gathered(x, rows, row_scale)
    y, s, yt, st = quantize_act_both(x, False, None, rows, row_scale)
    y_ref, s_ref = quantize_act_ref(X)
    yt_ref, st_ref = quantize_act_t_ref(X)
    assert y.shape == (n, K) and yt.shape == (K, n)
    assert torch.equal(s, s_ref) and torch.equal(_codes(y), _codes(y_ref))
    assert torch.equal(st, st_ref) and torch.equal(_codes(yt), _codes(yt_ref))


def test_quantize_act_gather_arguments_are_checked():
    x = torch.randn(4, 128)
    with pytest.raises(AssertionError, match="1-D index"):
        quantize_act(x, rows=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(AssertionError, match="int32/int64"):
        quantize_act(x, rows=torch.zeros(3))
    with pytest.raises(AssertionError, match=r"row_scale must be contiguous \[3\]"):
        quantize_act(x, rows=torch.zeros(3, dtype=torch.long), row_scale=torch.ones(4))


@pytest.mark.parametrize("shape", [(200, 300), (2, 130, 129)])
def test_quantize_weight_transposed_copy(shape):
    """transposed=True also writes the K-major copy dgrad reads, from the same pass: W's codes, transposed."""
    w = _inputs(shape, torch.bfloat16, seed=9)
    y, s, yt = quantize_weight(w, transposed=True)
    y_ref, s_ref = quantize_weight_ref(w)
    assert torch.equal(s, s_ref) and torch.equal(_codes(y), _codes(y_ref))
    assert yt.shape == (*shape[:-2], shape[-1], shape[-2]) and yt.is_contiguous()
    assert torch.equal(_codes(yt), _codes(y_ref.transpose(-1, -2).contiguous()))


def _trunc_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: what the interpreter's cast does (hardware rounds to nearest)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(576, 300), (3, 200, 130)])
def test_dequantize_weight(shape):
    w = _inputs(shape, torch.float32, seed=7)
    y, s = quantize_weight_ref(w)
    assert torch.equal(dequantize_weight(y, s, torch.float32), dequantize_weight_ref(y, s, torch.float32))
    # bf16 output: exactly the truncated fp32 reference (the interpreter's cast), not "close".
    expected = _trunc_bf16(dequantize_weight_ref(y, s, torch.float32))
    assert torch.equal(dequantize_weight(y, s, torch.bfloat16), expected)


def test_roundtrip_error_is_half_an_e4m3_ulp():
    x = _inputs((64, 384), torch.float32, seed=3)
    y, s = quantize_act(x)
    s_el = s.repeat_interleave(128, 1)
    err = (y.float() * s_el - x).abs()
    # normals: half an ulp = 2^-4 relative; subnormals (|x/s| < 2^-6): half the quantum 2^-9.
    assert bool((err <= torch.maximum(x.abs() * 2**-4, s_el * 2**-10)).all())


def test_pow2_scales_are_powers_of_two_covering_the_tile():
    x = _inputs((16, 256), torch.float32, seed=5)
    _, s = quantize_act(x, pow2=True)
    mant, _ = torch.frexp(s)
    assert bool((mant == 0.5).all())
    amax = x.abs().view(16, 2, 128).amax(-1)
    assert bool((amax / s <= 448).all()) and bool((amax / s > 224).all())


@triton.jit
def _plain_cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def test_interpreter_cast_bug_is_real():
    """The bare interpreter cast fails the exact comparison above, only where rounding carries into
    the next power of two or lands on the smallest subnormal: evidence that the exact tests would
    catch a kernel that relied on it."""
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(4096, generator=g) * 2 - 1) * 448
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    _plain_cast_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
    ref = x.to(torch.float8_e4m3fn).float()
    bad = y.float() != ref
    assert 0 < int(bad.sum()) < 0.03 * x.numel()  # ~1% of values
    mant, _ = torch.frexp(ref[bad].abs())
    assert bool((mant == 0.5).all()), "mismatches only where the correct result is a power of two (a carry)"
    assert bool((y.float()[bad] == ref[bad] / 2).all()), "the carry is lost: 128 -> 64"
    # ... and the kernels' exact rounding gets exactly these values right.
    xs = x[bad].view(1, -1).contiguous()
    q, s = quantize_act(xs)
    q_ref, s_ref = quantize_act_ref(xs)
    assert torch.equal(_codes(q), _codes(q_ref))


def test_require_fp8_says_why(monkeypatch):
    require_fp8("test")  # interpreter: allowed on the CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    caps = capabilities()
    if caps.fp8:
        pytest.skip("this machine can run FP8")
    with pytest.raises(RuntimeError, match="CUDA|compute capability"):
        require_fp8("test")
    monkeypatch.setattr(kt, "capabilities", lambda: kt.Capabilities(triton=True, cuda=True, compute_capability=(8, 0)))
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*8\.0"):
        require_fp8("FP8Linear")
    monkeypatch.setattr(kt, "capabilities", lambda: kt.Capabilities(triton=False, cuda=True, compute_capability=(9, 0)))
    with pytest.raises(RuntimeError, match="Triton"):
        quantize_act(torch.randn(2, 128))


def test_import_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from modeling_deepseek_v3 import kernels as k\n"
        "assert not k.capabilities().triton\n"
        "import torch\n"
        "try:\n    k.quantize_act(torch.randn(2, 128))\nexcept RuntimeError as e:\n    assert 'Triton' in str(e), e; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


_GLUON_PTX_CHECK = """
import sys
import sm90
from modeling_deepseek_v3.kernels import quant as Q

def ptx(kernel, signature, constexprs, num_warps):
    # specialised as the launcher is for 16-divisible pointers and sizes
    divisible = [n for n, t in signature.items() if t != "constexpr"]
    return sm90.compile_ptx(kernel, signature, constexprs, num_warps, divisible=divisible, gluon=True)

pow2 = sys.argv[1] == "1"
spt_m, spt_k, tpw_m, warps_m, warps_k = Q.QUANT_T_GLUON
layout = {"SPT_M": spt_m, "SPT_K": spt_k, "TPW_M": tpw_m, "WARPS_M": warps_m, "WARPS_K": warps_k}
a = ptx(Q._quant_act_gluon_kernel,
        {"x_ptr": "*bf16", "yt_ptr": "*fp8e4nv", "st_ptr": "*fp32", "M": "i32", "K": "i32", "POW2": "constexpr",
         **{k: "constexpr" for k in layout}},
        {"POW2": pow2, **layout}, warps_m * warps_k)
# gathered, scaled rows with padding (-1) rows, as the routed experts' wgrad operands are quantised
ag = ptx(Q._quant_act_gluon_kernel,
         {"x_ptr": "*bf16", "rows_ptr": "*i64", "mult_ptr": "*bf16", "yt_ptr": "*fp8e4nv", "st_ptr": "*fp32",
          "M": "i32", "K": "i32", "POW2": "constexpr", "GATHER": "constexpr", "MULT": "constexpr",
          "SKIP_PADDING": "constexpr", **{k: "constexpr" for k in layout}},
         {"POW2": pow2, "GATHER": True, "MULT": True, "SKIP_PADDING": True, **layout}, warps_m * warps_k)
spt_n, spt_kw, tpw_n, warps_n, warps_kw = Q.QUANT_WEIGHT_T_GLUON
w = ptx(Q._quant_weight_t_gluon_kernel,
        {"w_ptr": "*bf16", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32", "yt_ptr": "*fp8e4nv", "N": "i32", "K": "i32",
         "POW2": "constexpr", "SPT_N": "constexpr", "SPT_K": "constexpr", "TPW_N": "constexpr",
         "WARPS_N": "constexpr", "WARPS_K": "constexpr"},
        {"POW2": pow2, "SPT_N": spt_n, "SPT_K": spt_kw, "TPW_N": tpw_n, "WARPS_N": warps_n, "WARPS_K": warps_kw},
        warps_n * warps_kw)
sass = {}
for name, p in (("a", a), ("ag", ag), ("w", w)):
    report, sass[name] = sm90.assemble(p, sass=True)
    assert sm90.spill_free(report), report
# Instruction counts that held the kernels back once (benchmarks/RESULTS.md, session 18), a thread's share:
# - the quotient x / s by Markstein's correction is two FMAs an element after one multiply (the residual must negate
#   the scale, not the quotient, or x * r is computed twice: a third FMA an element);
# - one div.rn a scale (1/s), the scale amax / 448 itself by the constant reciprocal (two more FMAs a scale);
# - the 128x1 kernel changes layout before the e4m3 cast: its SASS packs no bytes by hand (PRMT for the bf16 ->
#   fp32 conversion, half an element, and the scaled rows' bf16 rounding: 64 and 84 for 128 elements; with the
#   e4m3 bytes converted instead, 192 and 218).
act_elems = spt_m * spt_k  # the [128, BLOCK_K] tile over 32 * WARPS_M * WARPS_K threads
for p, elems, scales in ((a, act_elems, spt_k), (ag, act_elems, spt_k), (w, 128 * 128 // (32 * warps_n * warps_kw), 1)):
    assert p.count("div.rn.f32") == scales, (p.count("div.rn.f32"), scales)
    assert p.count("fma.rn.f32") == 2 * elems + 2 * scales, (p.count("fma.rn.f32"), elems, scales)
for name in ("a", "ag"):
    prmt = sum(1 for line in sass[name].splitlines() if " PRMT " in line)
    assert prmt <= act_elems * 3 // 4, f"{prmt} PRMT for {act_elems} elements: bytes repacked after the cast?"
for p, spt in ((a, spt_m), (ag, spt_m), (w, spt_n)):
    assert "st.shared.b8" not in p and "st.shared.u8" not in p, "a byte-wise transpose through shared memory"
    assert "st.global.b8" not in p and "st.global.u8" not in p, "a byte-wise global store"
    wide = {16: "st.global.v4.b32", 8: "st.global.v2.b32", 4: "st.global.b32"}[spt]
    assert wide in p, f"the transposed store of {spt} bytes a thread should be {wide}"
print("ok")
"""


@pytest.mark.parametrize("pow2", [False, True])
def test_gluon_transposed_stores_are_wide_and_skip_shared_memory(pow2, without_interpreter):
    """The GPU path of quantize_act_t and of quantize_weight(transposed=True) is Gluon, which the
    interpreter cannot run (its bits are checked on the GPU by benchmarks/bench_quant.py).
    Here, compiled for sm_90 on the CPU (a subprocess without TRITON_INTERPRET, under which @triton.jit
    helpers are interpreter objects that Gluon cannot call): the transposed store is SPT_M bytes a
    thread at the shipped tiles, and no byte goes through shared memory (the old kernels transposed
    through it one byte at a time)."""
    from modeling_deepseek_v3.kernels import quant as Q

    if not Q.HAS_GLUON:
        pytest.skip("no Gluon kernels for this Triton (validated: kernels._triton.GLUON_VALIDATED_TRITON)")
    assert not Q._use_gluon(None, None), "the interpreter must take the @triton.jit kernels"
    without_interpreter(_GLUON_PTX_CHECK, str(int(pow2)))


_GLUON_GPU_CHECK = """
import torch
from modeling_deepseek_v3.kernels import quant as Q

assert Q._use_gluon(None, None), "the GPU default should be the Gluon kernels"
bad = []
for shape in [(1024, 7168), (777, 1000), (130, 200)]:
    x = (torch.randn(*shape, device="cuda") * torch.logspace(-3, 2, shape[1], device="cuda")).to(torch.bfloat16)
    for pow2 in (False, True):
        qt, st = Q.quantize_act_t(x, pow2)
        rt, rst = Q.quantize_act_t_ref(x.cpu(), pow2)
        q, s, qT = Q.quantize_weight(x, pow2, transposed=True, impl="gluon")
        rq, rs = Q.quantize_weight_ref(x.cpu(), pow2)
        pairs = [(qt, rt), (st, rst), (q, rq), (s, rs), (qT, rq.t().contiguous())]
        # the routed experts' gathered, scaled rows (quant.quantize_act's rows / row_scale), both tilings
        rows = torch.randint(0, shape[0], (3 * shape[0] + 5,), device="cuda")
        rows[::3] = -1  # padding rows: zeros
        scale = torch.rand(rows.shape[0], device="cuda").to(torch.bfloat16)
        X = (torch.where((rows >= 0)[:, None], x[rows.clamp(min=0)], 0.0) * scale[:, None]).cpu()
        pairs += list(zip(Q.quantize_act_both(x, pow2, None, rows, scale),
                          (*Q.quantize_act_ref(X, pow2), *Q.quantize_act_t_ref(X, pow2))))
        # the wgrad's padded layout ends in tiles of padding only, which skip_padding_tiles may leave unwritten:
        # every other tile (the last real one holds some padding too) must still equal the reference
        tail = 2 * 128 + 77
        rows_p, scale_p = torch.cat([rows, rows.new_full((tail,), -1)]), torch.cat([scale, scale.new_ones(tail)])
        qt, st = Q.quantize_act_t(x, pow2, rows=rows_p, row_scale=scale_p, skip_padding_tiles=True)
        rt, rst = Q.quantize_act_t_ref(torch.cat([X, X.new_zeros(tail, shape[1])]), pow2)
        live = torch.nn.functional.pad(rows_p.cpu(), (0, -rows_p.shape[0] % 128), value=-1).view(-1, 128).amax(1) >= 0
        assert not live.all() and live.sum() == -(-rows.shape[0] // 128)  # tiles to skip, and the live ones
        pairs += [(qt.cpu()[:, live.repeat_interleave(128)[: rows_p.shape[0]]],
                   rt[:, live.repeat_interleave(128)[: rows_p.shape[0]]]), (st.cpu()[:, live], rst[:, live])]
        bad += [(shape, pow2, i) for i, (a, b) in enumerate(pairs)
                if not torch.equal(a.cpu().view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a.cpu(),
                                   b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)]
assert not bad, bad
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Gluon kernels do not interpret)")
def test_gluon_transposed_quantisation_is_bit_exact_on_the_gpu(without_interpreter):
    """The GPU path of quantize_act_t and quantize_weight(transposed=True), and both activation tilings of gathered
    and scaled rows: codes and scales equal the CPU torch references bit for bit, ragged shapes and pow2 included (a subprocess without TRITON_INTERPRET: the conftest's
    interpreter mode would turn the shared @triton.jit helpers into interpreter objects)."""
    from modeling_deepseek_v3.kernels import quant as Q

    if not Q.HAS_GLUON:
        pytest.skip("no Gluon kernels for this Triton (validated: kernels._triton.GLUON_VALIDATED_TRITON)")
    without_interpreter(_GLUON_GPU_CHECK, timeout=600)
