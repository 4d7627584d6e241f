"""FP8 forward GEMM for a few rows (decoding): y = x W^T from bf16 x and an official checkpoint's e4m3 W.

Decoding one sequence, a projection's forward is a pass over its weight: M = 1 row of x against N x K bytes of e4m3.
fp8_gemm's tiles are cut for thousands of rows (64-128 rows of x, 128 of W a tile), so at M = 1 a [1536, 7168]
projection is 12 tiles for 132 SMs, and the input's 1x128 quantisation is a launch of its own before it. On an H200
FP8-checkpoint decoding of one sequence ran at 0.84-0.91x the bf16 model in a CUDA graph (benchmarks/RESULTS.md,
"FP8-checkpoint inference on one H200"), with half the bytes to read. This kernel is cut for that case instead:
- a program takes BLOCK_N (16-64) rows of W, so a projection is hundreds of programs;
- it quantises x's 1x128 tiles itself (quant._quantize_rows: quantize_act's codes and scales, bit for bit), so
  the forward is one launch;
- the tensor cores take 16 rows of A: x's M rows (M <= 16) are quantised once, as a power of two `ROWS` >= M, and
  repeated to 16 (row r of the dot holds x's row r % ROWS), rather than quantising 16 - M rows of zeros;
- K_STEPS 128-steps go as one batch: x's and W's tiles in one load each, one batched dot (a step's product stays
  its own), so that the steps' latencies overlap.
On an H200 (benchmarks/RESULTS.md, session 20) that makes it 1.24-1.28x quantize_act + fp8_gemm at 1-4 rows on
the small projections, which are latency-bound (q_a, kv_a, the shared expert's gate and up; its down 0.98-1.19x).
On the large ones it streams W at 1.6-1.9 TB/s against fp8_gemm's 2.1-2.8 and loses (0.64-0.81x), so
FP8InferenceLinear takes it for small weights only (fp8_linear.GEMV_MAX_ROWS, GEMV_MAX_WEIGHT).
The recipe is fp8_gemm's: one dot a 128-step, scaled by both scales into an fp32 accumulator (DeepSeek-V3 sec.
3.3.2), so the result is fp8_gemm(*quantize_act(x), W) up to the order of the fp32 sums.

Shape legend as in fp8_gemm.py: M rows, N output features, K input features, Kb = ceil(K / 128).
"""

from __future__ import annotations

import torch

from . import _triton as tt
from .fp8_gemm import _check_fp8, m_bucket
from .quant import BLOCK, FAST_DIV

triton, tl = tt.triton, tt.tl

MAX_ROWS = 16  # the rows of one tensor-core tile (mma m16): the most rows this kernel takes
# The autotuner's pick per (row bucket, N, K, dtypes, device), filled by the first call; later calls launch the kernel
# with it directly, as fp8_gemm's _TMA_BEST does.
_BEST: dict = {}


def _configs() -> list:
    if tt.interpreting():
        return [triton.Config({"BLOCK_N": 16, "K_STEPS": 2}, num_warps=4, num_stages=1)]
    # The autotuner picks among these per (row bucket, N, K) at the first call; on an H200 at V3's projections it
    # took (16, 4, 2, 3) at 1-4 rows nearly everywhere (benchmarks/bench_fp8_decode_gemm.py). Reasoning
    # from the sm_90a code (no spills in any): memory-bound, so what matters is the bytes of W in flight. Within a
    # program a step is a chain of latencies (the loads, x's amax across warps, the dot), and a projection with few
    # programs (q_a: 1536 rows, 96 programs of 16) is its steps' chains end to end. K_STEPS steps an iteration run
    # their chains side by side; stages pipeline the loads.
    return [
        triton.Config({"BLOCK_N": bn, "K_STEPS": ks}, num_warps=w, num_stages=s)
        for bn, ks, w, s in (
            (16, 1, 4, 4),
            (16, 2, 4, 4),
            (16, 4, 4, 3),
            (16, 4, 2, 3),
            (32, 2, 4, 3),
            (32, 4, 4, 3),
            (64, 1, 4, 4),
            (64, 2, 4, 3),
        )
    ]


if tt.HAS_TRITON:
    from .quant import _quantize_rows

    @triton.jit
    def _gemv_steps(
        acc, x_ptr, w_ptr, ws_ptr, step0, kb, row_ok, n_ok, K,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, K_STEPS: tl.constexpr, MASK: tl.constexpr, EXACT: tl.constexpr,
        FAST_DIV: tl.constexpr,
    ):  # fmt: skip
        """acc[16, BLOCK_N] + K_STEPS 128-steps from step0, as one batch: x's [K_STEPS, ROWS, 128] tiles in one load,
        quantised, dotted with W's [K_STEPS, BLOCK_N, 128] tiles (one batched dot: a step's product stays its own),
        each step scaled by both scales. x_ptr at x's first column, w_ptr at the program's first row of W, ws_ptr at
        its scale row. MASK: steps past kb or a ragged K read as zeros."""
        offs_j = tl.arange(0, K_STEPS)
        offs_r = tl.arange(0, ROWS)
        offs_k = tl.arange(0, 128)
        offs_n = tl.arange(0, BLOCK_N)
        col = (step0 + offs_j)[:, None, None] * 128 + offs_k[None, None, :]  # [K_STEPS, 1, 128]
        x_mask = row_ok[None, :, None]
        w_mask = n_ok[None, :, None]
        if MASK:
            x_mask = x_mask & (col < K)
            w_mask = w_mask & (col < K)
        x = tl.load(x_ptr + offs_r[None, :, None] * K + col, mask=x_mask, other=0.0)  # [K_STEPS, ROWS, 128]
        w = tl.load(w_ptr + offs_n[None, :, None].to(tl.int64) * K + col, mask=w_mask, other=0.0)  # [K_STEPS, BN, 128]
        w_s = tl.load(ws_ptr + step0 + offs_j, mask=step0 + offs_j < kb, other=0.0)  # [K_STEPS]
        q, x_s = _quantize_rows(tl.reshape(x.to(tl.float32), (K_STEPS * ROWS, 128)), False, FAST_DIV, EXACT)
        # the tensor cores take 16 rows: x's ROWS rows repeated (row r of a step's tile holds x's row r % ROWS)
        q = tl.reshape(tl.broadcast_to(tl.reshape(q, (K_STEPS, 1, ROWS, 128)), (K_STEPS, 16 // ROWS, ROWS, 128)),
                       (K_STEPS, 16, 128))  # fmt: skip
        x_s = tl.reshape(tl.broadcast_to(tl.reshape(x_s, (K_STEPS, 1, ROWS)), (K_STEPS, 16 // ROWS, ROWS)),
                         (K_STEPS, 16))  # fmt: skip
        part = tl.dot(q, tl.permute(w, (0, 2, 1)))  # [K_STEPS, 16, BLOCK_N]
        return acc + tl.sum(part * (x_s * w_s[:, None])[:, :, None], axis=0)

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _fp8_gemv_kernel(
        x_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, M_BUCKET,
        ROWS: tl.constexpr, EVEN_K: tl.constexpr, EXACT: tl.constexpr, FAST_DIV: tl.constexpr,
        BLOCK_N: tl.constexpr, K_STEPS: tl.constexpr,
    ):  # fmt: skip
        # x_MK (bf16/fp16/fp32), w_NK e4m3, ws_NbKb fp32, y_MN: contiguous. One program: y[:, BLOCK_N columns].
        pid_n = tl.program_id(0)
        kb = tl.cdiv(K, 128)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_ptr += (pid_n * BLOCK_N).to(tl.int64) * K
        # BLOCK_N divides 128, so the program's rows of W lie in one 128-row block: one scale a step
        ws_ptr += ((pid_n * BLOCK_N) // 128) * kb
        row_ok = tl.arange(0, ROWS) < M
        n_ok = offs_n < N
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        whole = kb // K_STEPS  # batches of K_STEPS whole steps; then one masked batch for the rest, if any
        for i in range(0, whole):
            acc = _gemv_steps(acc, x_ptr, w_ptr, ws_ptr, i * K_STEPS, kb, row_ok, n_ok, K, ROWS, BLOCK_N, K_STEPS,
                              not EVEN_K, EXACT, FAST_DIV)  # fmt: skip
        if whole * K_STEPS < kb:
            acc = _gemv_steps(acc, x_ptr, w_ptr, ws_ptr, whole * K_STEPS, kb, row_ok, n_ok, K, ROWS, BLOCK_N, K_STEPS,
                              True, EXACT, FAST_DIV)  # fmt: skip
        offs_m = tl.arange(0, 16)  # M <= ROWS: the rows past M (x's repeats and padding) are not stored
        y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def fp8_gemv(
    x_MK: torch.Tensor, w_NK: torch.Tensor, w_scale_NbKb: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y[M, N] = x W^T for M <= MAX_ROWS rows of x (bf16, fp16 or fp32), quantised 1x128 in the kernel as
    quantize_act(x) would, times e4m3 W with its 128x128 weight_scale_inv. out_dtype defaults to x's dtype."""
    tt.require_fp8("fp8_gemv")
    assert x_MK.dim() == 2 and x_MK.is_contiguous(), f"x_MK must be a contiguous 2-D tensor, got {tuple(x_MK.shape)}"
    assert x_MK.dtype in (torch.bfloat16, torch.float16, torch.float32), (
        f"x_MK must be a float tensor, got {x_MK.dtype}"
    )
    _check_fp8(w_NK, w_scale_NbKb, "w_NK")
    M, K = x_MK.shape
    N = w_NK.shape[0]
    assert M <= MAX_ROWS, f"fp8_gemv takes at most {MAX_ROWS} rows, got {M}: use quantize_act and fp8_gemm"
    assert w_NK.shape[1] == K, f"reduction dims differ: {K} vs {w_NK.shape[1]}"
    Nb, Kb = triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)
    assert w_scale_NbKb.shape == (Nb, Kb), f"W scales must be [{Nb}, {Kb}], got {tuple(w_scale_NbKb.shape)}"
    assert x_MK.device == w_NK.device == w_scale_NbKb.device, "x, W and its scales must be on one device"
    y = torch.empty(M, N, dtype=out_dtype or x_MK.dtype, device=x_MK.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()

    bucket = m_bucket(M)
    args = (x_MK, w_NK, w_scale_NbKb.contiguous(), y, M, N, K, bucket)
    consts = dict(
        ROWS=bucket, EVEN_K=K % BLOCK == 0, EXACT=tt.interpreting(), FAST_DIV=FAST_DIV and not tt.interpreting()
    )
    key = (bucket, N, K, x_MK.dtype, y.dtype, x_MK.device)
    cfg = _BEST.get(key)
    if cfg is None:
        _fp8_gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **consts)
        _BEST[key] = _fp8_gemv_kernel.best_config
    else:  # tuned before: the plain kernel, without the autotuner's per-call work (decoding is host-bound eagerly)
        _fp8_gemv_kernel.fn[(triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)](
            *args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    return y
