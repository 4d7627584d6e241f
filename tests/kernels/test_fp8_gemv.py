"""fp8_gemv (the decoding GEMM: x quantised 1x128 inside the kernel) vs the two-step recipe's torch reference.

The reference quantises x with quantize_act_ref and multiplies dequantised operands in fp32, so a float32 output
may differ only by the fp32 summation order (TOL[float32]). One e4m3 code off by one step moves a dot product by
~1/16 of a term, orders of magnitude above that: the comparison sees a quantisation that is not quantize_act's.

The interpreter's float->fp8 cast loses a carry into the next power of two (test_quant.py): the kernel rounds by
exact arithmetic first under the interpreter (EXACT), and the inputs below put carry values into x's tiles, so
`test_the_carry_values_are_exercised` shows the bare cast would fail the comparison.
"""

import importlib

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import (  # noqa: E402
    FP8InferenceLinear,
    fp8_gemm_ref,
    fp8_gemv,
    fp8_linear,
    quantize_act_ref,
    quantize_weight_ref,
)

gemv_module = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemv")  # the package's fp8_gemv is the function

# x / scale of these lands just below a power of two (127.93 -> 128, 15.99 -> 16) when the tile's amax is 447.9
CARRY = [447.9, 127.9, -15.99, 0.2499, 1.0 / 512 * 0.6]

# (M, N, K): every row count class (1: a single row repeated 16 times, 2-8: repeated rows, 16: none), N not a
# multiple of any BLOCK_N (200, 72) or of 128 (576), K ragged (300, 7) or whole (256)
SHAPES = [(1, 200, 256), (2, 72, 300), (3, 576, 256), (5, 200, 7), (8, 64, 384), (16, 130, 256)]


def _x(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (1 + 30 * torch.rand(K, generator=g))
    x[0, : min(K, len(CARRY))] = torch.tensor(CARRY)[:K]  # row 0's first tile: amax 447.9, scale ~1
    return x.to(dtype)


def _w(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight_ref(torch.randn(N, K, generator=g) * (0.01 + torch.rand(N, 1, generator=g)))


def _reference(x, wq, ws):
    return fp8_gemm_ref(*quantize_act_ref(x), wq, ws, torch.float32)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_matches_the_quantise_then_gemm_recipe(M, N, K, x_dtype, tol, rel):
    x = _x(M, K, x_dtype, seed=M * 1000 + K)
    wq, ws = _w(N, K, seed=N)
    ref = _reference(x, wq, ws)
    y = fp8_gemv(x, wq, ws, torch.float32)  # the first call of its shape: through the autotuner
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel(y, ref) < tol[torch.float32]
    assert torch.equal(fp8_gemv(x, wq, ws, torch.float32), y)  # later calls: its pick launched directly
    y16 = fp8_gemv(x, wq, ws)  # out_dtype defaults to x's
    assert y16.dtype == x_dtype and rel(y16, ref) < tol[x_dtype]


def test_every_row_is_its_own(rel, tol):
    """Rows are repeated to the tensor core's 16: each stored row must be computed from its own row of x (a wrong
    repetition would store row 0's product everywhere, or a padding row's)."""
    M, N, K = 5, 48, 256
    x = _x(M, K, torch.bfloat16, seed=7)
    wq, ws = _w(N, K, seed=8)
    y = fp8_gemv(x, wq, ws, torch.float32)
    for m in range(M):
        assert rel(y[m], _reference(x[m : m + 1], wq, ws)[0]) < tol[torch.float32]
    assert all(rel(y[m], y[0]) > 0.1 for m in range(1, M))


def test_the_carry_values_are_exercised(tol, rel):
    """The same kernel with the bare cast (EXACT=False under the interpreter) fails the comparison on these inputs:
    so the tests above would see a kernel that rounded through the interpreter's broken cast."""
    M, N, K = 1, 16, 128
    x = _x(M, K, torch.float32, seed=3)
    wq, ws = _w(N, K, seed=4)
    y = torch.empty(M, N)
    gemv_module._fp8_gemv_kernel[(1,)](x, wq, ws, y, M, N, K, 1, ROWS=1, EVEN_K=True, EXACT=False, FAST_DIV=False)
    assert rel(y, _reference(x, wq, ws)) > 100 * tol[torch.float32]


def test_bad_inputs_say_why():
    wq, ws = _w(32, 256, seed=0)
    with pytest.raises(AssertionError, match="at most 16 rows"):
        fp8_gemv(torch.randn(17, 256), wq, ws)
    with pytest.raises(AssertionError, match="reduction dims differ"):
        fp8_gemv(torch.randn(2, 128), wq, ws)
    with pytest.raises(AssertionError, match="W scales must be"):
        fp8_gemv(torch.randn(2, 256), wq, ws[:, :1].contiguous())
    with pytest.raises(AssertionError, match="float tensor"):
        fp8_gemv(torch.ones(2, 256, dtype=torch.int32), wq, ws)
    assert fp8_gemv(torch.randn(0, 256), wq, ws).shape == (0, 32)


@pytest.mark.parametrize("M", [3, 17])
def test_inference_linear_selects_by_rows(monkeypatch, M, rel, tol):
    """FP8InferenceLinear takes fp8_gemv up to GEMV_MAX_ROWS rows and GEMV_MAX_WEIGHT weight elements, and
    quantize_act + fp8_gemm otherwise; both compute the same recipe."""
    linear = torch.nn.Linear(256, 200, bias=True)
    fp8 = FP8InferenceLinear.from_linear(linear)
    x = torch.randn(M, 256)
    calls = []
    monkeypatch.setattr(fp8_linear, "fp8_gemv", lambda *a: calls.append(a) or gemv_module.fp8_gemv(*a))
    monkeypatch.setattr(fp8_linear, "GEMV_MAX_ROWS", 16)
    y = fp8(x[None])  # [1, M, 256]: rows are the flattened leading dims
    assert y.shape == (1, M, 200) and len(calls) == (M <= 16)
    monkeypatch.setattr(fp8_linear, "GEMV_MAX_WEIGHT", 200 * 256 - 1)  # one element short of this weight
    assert rel(fp8(x[None]), y) < tol[torch.float32] and len(calls) == (M <= 16), "over the weight cap: two steps"
    monkeypatch.setattr(fp8_linear, "GEMV_MAX_WEIGHT", 200 * 256)
    fp8(x)
    assert len(calls) == 2 * (M <= 16)
    monkeypatch.setattr(fp8_linear, "GEMV_MAX_ROWS", 0)
    assert rel(y[0], fp8(x)) < tol[torch.float32]
    assert rel(y[0], _reference(x, fp8.weight, fp8.weight_scale_inv) + linear.bias.detach()) < tol[torch.float32]


_COMPILE = """
import importlib
import sm90

G = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemv")
sig = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", ws_ptr="*fp32", y_ptr="*bf16", M="i32", N="i32", K="i32", M_BUCKET="i32",
           ROWS="constexpr", EVEN_K="constexpr", EXACT="constexpr", FAST_DIV="constexpr", BLOCK_N="constexpr",
           K_STEPS="constexpr")
configs = G._configs()
assert len(configs) > 1  # the GPU's list, not the interpreter's
for cfg in configs:
    for rows in (1, 2, 16):
        for even_k in (True, False):
            consts = dict(ROWS=rows, EVEN_K=even_k, EXACT=False, FAST_DIV=True, **cfg.kwargs)
            ptx = sm90.compile_ptx(G._fp8_gemv_kernel.fn, sig, consts, cfg.num_warps, cfg.num_stages,
                                   divisible=("x_ptr", "w_ptr", "ws_ptr", "y_ptr", "N", "K"))
            report, _ = sm90.assemble(ptx)
            assert sm90.spill_free(report), (cfg, rows, even_k, report)
            # tensor cores, and the loads pipelined through shared memory (cp.async) rather than waited on a step
            assert "mma.sync" in ptx and "cp.async" in ptx, (cfg, rows, even_k)
print("ok")
"""


def test_compiles_for_sm90_without_spills(without_interpreter):
    """The interpreter never compiles the kernel: every autotuned configuration must build for sm_90 (each row-count
    class, whole and ragged K) without spills, on tensor cores, with W's loads pipelined. A subprocess without
    TRITON_INTERPRET."""
    without_interpreter(_COMPILE, timeout=600)


_GPU_CHECK = """
import torch
from modeling_deepseek_v3.kernels import fp8_gemm, fp8_gemm_ref, fp8_gemv, quantize_act, quantize_weight

torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
for N, K in [(1536, 7168), (576, 7168), (24576, 1536), (200, 300)]:
    wq, ws = quantize_weight(torch.randn(N, K, device="cuda").bfloat16() * 0.02)
    for M in (1, 3, 16):
        x = (torch.randn(M, K, device="cuda") * (1 + 10 * torch.rand(K, device="cuda"))).bfloat16()
        xq, xs = quantize_act(x)
        ref = fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
        y = fp8_gemv(x, wq, ws, torch.float32)
        # The same codes (quantize_act's) and exact products (the mma takes e4m3 values as fp16) summed in fp32:
        # only the order of the sums differs. fp8_gemm's fp8 tensor cores sum a step more coarsely (1e-3 there).
        assert rel(y, ref) < 1e-5, (N, K, M, rel(y, ref))
        assert rel(fp8_gemv(x, wq, ws), fp8_gemm(xq, xs, wq, ws)) < 1e-2
        assert torch.equal(y, fp8_gemv(x, wq, ws, torch.float32)), "one result, run to run"
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_fp8_gemv_on_the_gpu(without_interpreter):
    """fp8_gemv compiled for the GPU and autotuned, at V3's decoding projections (q_a, kv_a, q_b) and a ragged
    shape, 1, 3 and 16 rows: against the reference and fp8_gemm, and deterministic."""
    without_interpreter(_GPU_CHECK, timeout=600)
