"""Block-scaled FP8 GEMM, forward and backward: y = x W^T with DeepSeek-V3's fine-grained scaling.

Each 128-wide step along the reduction dim is one tensor-core dot over e4m3 operands; its fp32
result is multiplied by that step's two scales and added into an fp32 accumulator. That is the
paper's "promotion to FP32 every 128 K-elements" (sec. 3.3.2): the tensor core never accumulates
more than 128 products in its reduced-precision adder, and the scales stay per tile.

One kernel serves the three GEMMs of a linear layer, as C[M, N] = A[M, K] @ B[N, K]^T with both
operands K-major (e4m3 tensor-core operands must be) and A scaled per row in 1x128 tiles:
  forward  y[M, N]  = x[M, K]     . W[N, K]     B scaled in 128x128 blocks (weight_scale_inv)
  dgrad    dx[M, K] = dy[M, N]    . W^T[K, N]   B scaled in 128x128 blocks (the same blocks)
  wgrad    dW[N, K] = dy^T[N, M]  . x^T[K, M]   B scaled per row in 1x128 tiles along tokens,
                                                i.e. the 128x1 tiling of x (quant.quantize_act_t)

Shape legend: M tokens, N output features, K input features; Mb, Nb, Kb = ceil(dim / 128).
"""

from __future__ import annotations

import torch

from . import _triton as tt
from .quant import BLOCK, dequantize_act_ref, expand_block_scale

triton, tl = tt.triton, tt.tl


def _gemm_configs() -> list:
    if tt.interpreting():
        # The interpreter runs on the CPU one program at a time: few, mid-sized tiles are fastest.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # Hopper: BLOCK_K = 128 is fixed by the scale blocks; one stage holds (BM + BN) * 128 B of fp8,
    # so 3-4 stages of 128x128..128x256 tiles fit in 228 KB of shared memory. 8 warps = two
    # warpgroups issuing wgmma on a 128-row tile; 4 warps for the narrower tiles.
    cfg = [
        (128, 128, 8, 3),
        (128, 128, 8, 4),
        (128, 128, 4, 4),
        (128, 256, 8, 3),
        (256, 128, 8, 3),
        (64, 128, 4, 4),
        (64, 256, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s) for bm, bn, w, s in cfg
    ]


if tt.HAS_TRITON:

    @triton.jit
    def _scaled_dot_loop(
        acc,
        a_ptr,
        b_ptr,
        as_ptr,
        bs_ptr,
        offs_m,
        offs_n,
        k_lo,
        k_hi,
        stride_a,
        stride_b,
        stride_as,
        stride_bs,
        B_BLOCKWISE: tl.constexpr,
        MASK_K: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """acc[BM, BN] += sum over 128-steps of (A . B^T)_step * a_scale[m, step] * b_scale[n, step].

        Steps are aligned to the global 128-blocks of the scales, so a range [k_lo, k_hi) that
        starts mid-block (an expert's tokens in the grouped wgrad) begins with a partial, masked step.
        offs_m / offs_n must be in bounds (callers wrap or clamp them; the store masks).
        """
        k_start = (k_lo // BLOCK_K) * BLOCK_K
        offs_kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_a + (k_start + offs_kk)[None, :]  # [BM, BK]
        b_ptrs = b_ptr + offs_n[None, :] * stride_b + (k_start + offs_kk)[:, None]  # [BK, BN]
        if B_BLOCKWISE:
            bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bs  # one 128x128 block per 128 rows of B
        else:
            bs_ptrs = bs_ptr + offs_n * stride_bs
        as_ptrs = as_ptr + offs_m * stride_as
        for k0 in range(k_start, k_hi, BLOCK_K):
            kb = k0 // BLOCK_K
            if MASK_K:
                offs_k = k0 + offs_kk
                k_ok = (offs_k >= k_lo) & (offs_k < k_hi)
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            a_s = tl.load(as_ptrs + kb)
            b_s = tl.load(bs_ptrs + kb)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped ordering: GROUP_M row-tiles sweep the N tiles together, so their B columns are
        # reused from L2 instead of re-read from HBM.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        return pid_m, pid_n

    @triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "B_BLOCKWISE"])
    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        as_ptr,
        bs_ptr,
        M,
        N,
        K,
        M_BUCKET,
        B_BLOCKWISE: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # a_MK, b_NK, c_MN contiguous; as_MKb; bs_NbKb (B_BLOCKWISE) or bs_NKb.
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Wrapped indices keep the loads in bounds without masks (the rows they fetch twice are
        # never stored), which lets the loads pipeline freely.
        kb = tl.cdiv(K, 128)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _scaled_dot_loop(
            acc, a_ptr, b_ptr, as_ptr, bs_ptr, offs_m % M, offs_n % N, 0, K, K, K, kb, kb,
            B_BLOCKWISE=B_BLOCKWISE, MASK_K=not EVEN_K, BLOCK_K=128,
        )  # fmt: skip
        c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_operand(x: torch.Tensor, name: str, dims: int = 2) -> None:
    assert x.dim() == dims, f"{name} must be {dims}-D, got {tuple(x.shape)}"
    assert x.is_contiguous(), f"{name} must be contiguous"


def _check_fp8(x: torch.Tensor, s: torch.Tensor, name: str) -> None:
    assert x.dtype == torch.float8_e4m3fn, f"{name} must be float8_e4m3fn, got {x.dtype}"
    assert s.dtype == torch.float32, f"{name} scales must be float32, got {s.dtype}"
    _check_operand(x, name, x.dim())
    _check_operand(s, f"{name} scales", s.dim())


def m_bucket(m: int) -> int:
    """Autotune key for the token count: its power of two, so a new batch size rarely re-tunes."""
    return 1 << max(int(m) - 1, 0).bit_length()


def _launch(a, a_s, b, b_s, b_blockwise: bool, out_dtype: torch.dtype) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[0]
    Kb = triton.cdiv(K, BLOCK)
    assert b.shape[1] == K, f"reduction dims differ: {K} vs {b.shape[1]}"
    assert a_s.shape == (M, Kb), f"A scales must be [{M}, {Kb}], got {tuple(a_s.shape)}"
    b_rows = triton.cdiv(N, BLOCK) if b_blockwise else N
    assert b_s.shape == (b_rows, Kb), f"B scales must be [{b_rows}, {Kb}], got {tuple(b_s.shape)}"
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, M, N, K, m_bucket(M), B_BLOCKWISE=b_blockwise, EVEN_K=K % BLOCK == 0
    )  # fmt: skip
    return c


def fp8_gemm(
    x_MK: torch.Tensor,
    x_scale_MKb: torch.Tensor,
    w_NK: torch.Tensor,
    w_scale_NbKb: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Forward y[M, N] = x W^T from e4m3 x (1x128 scales) and e4m3 W (128x128 weight_scale_inv)."""
    tt.require_fp8("fp8_gemm")
    _check_fp8(x_MK, x_scale_MKb, "x_MK")
    _check_fp8(w_NK, w_scale_NbKb, "w_NK")
    return _launch(x_MK, x_scale_MKb, w_NK, w_scale_NbKb, True, out_dtype)


def fp8_gemm_dgrad(
    dy_MN: torch.Tensor,
    dy_scale_MNb: torch.Tensor,
    w_NK: torch.Tensor,
    w_scale_NbKb: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """dx[M, K] = dy W from e4m3 dy (1x128 scales along N) and the forward's e4m3 W blocks."""
    tt.require_fp8("fp8_gemm_dgrad")
    _check_fp8(dy_MN, dy_scale_MNb, "dy_MN")
    _check_fp8(w_NK, w_scale_NbKb, "w_NK")
    # The reduction runs over N now, so W must become N-major: a copy of N*K bytes, small beside
    # the GEMM's 2*M*N*K flops; a 128x128 block's scale is the same in either orientation.
    w_KN = w_NK.t().contiguous()
    return _launch(dy_MN, dy_scale_MNb, w_KN, w_scale_NbKb.t().contiguous(), True, out_dtype)


def fp8_gemm_wgrad(
    dyT_NM: torch.Tensor,
    dyT_scale_NMb: torch.Tensor,
    xT_KM: torch.Tensor,
    xT_scale_KMb: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """dW[N, K] = dy^T x from both operands in the transposed 128x1 tiling (quantize_act_t)."""
    tt.require_fp8("fp8_gemm_wgrad")
    _check_fp8(dyT_NM, dyT_scale_NMb, "dyT_NM")
    _check_fp8(xT_KM, xT_scale_KMb, "xT_KM")
    return _launch(dyT_NM, dyT_scale_NMb, xT_KM, xT_scale_KMb, False, out_dtype)


# ---------------------------------------------------------------------------------------------
# Torch references: dequantise, then matmul in fp32


def fp8_gemm_ref(x_MK, x_scale_MKb, w_NK, w_scale_NbKb, out_dtype=torch.bfloat16) -> torch.Tensor:
    w = w_NK.float() * expand_block_scale(w_scale_NbKb.float(), *w_NK.shape)
    return (dequantize_act_ref(x_MK, x_scale_MKb) @ w.t()).to(out_dtype)


def fp8_gemm_dgrad_ref(dy_MN, dy_scale_MNb, w_NK, w_scale_NbKb, out_dtype=torch.bfloat16) -> torch.Tensor:
    w = w_NK.float() * expand_block_scale(w_scale_NbKb.float(), *w_NK.shape)
    return (dequantize_act_ref(dy_MN, dy_scale_MNb) @ w).to(out_dtype)


def fp8_gemm_wgrad_ref(dyT_NM, dyT_scale_NMb, xT_KM, xT_scale_KMb, out_dtype=torch.float32) -> torch.Tensor:
    return (dequantize_act_ref(dyT_NM, dyT_scale_NMb) @ dequantize_act_ref(xT_KM, xT_scale_KMb).t()).to(out_dtype)
