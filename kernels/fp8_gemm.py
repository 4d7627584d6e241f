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

Two kernels compute it. On Hopper, where the operands suit the bulk tensor copy engine (TMA: row
strides and base pointers 16-byte aligned), `_fp8_gemm_tma_kernel` runs: persistent (one program
per SM walking the output tiles), operands loaded by TMA descriptors, ragged edges zero-filled by
the copy engine and clipped on the TMA store. Elsewhere (other strides, Ada) `_fp8_gemm_kernel`
runs with plain pointer loads. Both run under TRITON_INTERPRET=1, so the tests cover both.

Shape legend: M tokens, N output features, K input features; Mb, Nb, Kb = ceil(dim / 128).
"""

from __future__ import annotations

import functools

import torch

from . import _triton as tt
from . import fp8_gemm_gluon as _gluon
from .quant import BLOCK, dequantize_act_ref, expand_block_scale

triton, tl = tt.triton, tt.tl
if tt.HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor


def _gemm_configs() -> list:
    if tt.interpreting():
        # The interpreter runs on the CPU one program at a time: few, mid-sized tiles are fastest.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # Hopper: BLOCK_K = 128 is fixed by the scale blocks; one stage holds (BM + BN) * 128 B of fp8,
    # so 3-4 stages of 128x128..128x256 tiles fit in 228 KB of shared memory. 8 warps = two
    # warpgroups issuing wgmma on a 128-row tile; 4 warps for the narrower tiles.
    # (Fallback path since the TMA kernel: 64x128 / 4 warps / 4 stages won every V3 shape on an H200.)
    cfg = [(64, 128, 4, 4), (128, 128, 8, 3), (64, 256, 4, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s) for bm, bn, w, s in cfg
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages, programs resident per SM, flatten the tile and K loops) tried by
# the TMA kernel's autotuner. Triton waits for each tensor-core result before the per-128-K scale FMA, so a
# warpgroup holds both the accumulator and the fresh dot result: 64x128 per warpgroup (64 + 64 fp32 registers
# a thread) is the largest tile that does not spill; 8 warps = two warpgroups on a 128-row tile.
# Swept on an H200 (2026-11-30, benchmarks/bench_fp8_gemm.py --sweep): 64x128 / 4 warps / 3 stages with
# 2 programs an SM won most V3 shapes (745-934 TFLOPS at M=4096; two independent programs let one's
# tensor-core work overlap the other's scale FMAs), 128x128 / 8 warps / 4 stages some dgrad and
# M=16384 ones; 64x256 (592-670) and 128x128 with a float32 output (wgrad, spills: 216-247) lost.
TMA_CONFIGS = [
    (64, 128, 4, 3, 2, True),
    (64, 128, 4, 4, 2, True),
    (128, 128, 8, 4, 1, False),
    (64, 128, 4, 4, 8, False),
]


def _set_tma_blocks(nargs) -> None:
    bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
    nargs["a_desc"].block_shape = [bm, 128]
    nargs["b_desc"].block_shape = [bn, 128]
    nargs["c_desc"].block_shape = [bm, bn]


def _tma_configs() -> list:
    if tt.interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 2, "OCC": 1, "FLATTEN": False}, num_warps=4,
                              num_stages=1, pre_hook=_set_tma_blocks)]  # fmt: skip
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "OCC": occ, "FLATTEN": fl},
            num_warps=w,
            num_stages=s,
            pre_hook=_set_tma_blocks,
        )  # fmt: skip
        for bm, bn, w, s, occ, fl in TMA_CONFIGS
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
    def _tma_scaled_dot_loop(a_desc, b_desc, a_row, b_row, as_ptrs, bs_ptrs, kb_lo, kb_hi,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALAR_B: tl.constexpr):  # fmt: skip
        """The TMA kernels' K loop (dense and grouped): sum over 128-steps kb_lo..kb_hi-1 of (A . B^T)_step * a_s[m] *
        b_s[n], A's tile at row a_row, B's at b_row; SCALAR_B when the tile lies in one 128-block of B (one b_s a
        step)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(kb_lo, kb_hi):
            a = a_desc.load([a_row, ki * 128])
            b = b_desc.load([b_row, ki * 128])
            a_s = tl.load(as_ptrs + ki)
            b_s = tl.load(bs_ptrs + ki)
            if SCALAR_B:
                acc += tl.dot(a, b.T) * (a_s * b_s)[:, None]
            else:
                acc += (tl.dot(a, b.T) * a_s[:, None]) * b_s[None, :]
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

    @triton.jit
    def _fp8_gemm_tma_body(
        a_desc,
        b_desc,
        c_desc,
        as_ptr,
        bs_ptr,
        M,
        N,
        K,
        B_BLOCKWISE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
        OCC: tl.constexpr,
        FLATTEN: tl.constexpr,
        partial_ptr=None,
        SPLIT_K: tl.constexpr = 1,
    ):
        # Persistent: NUM_SMS * OCC programs (OCC resident per SM); program p computes output tiles
        # p, p + NUM_SMS * OCC, ... in grouped order.
        # a_desc over A[M, K] with block [BLOCK_M, 128]; b_desc over B[N, K], block [BLOCK_N, 128];
        # c_desc over C[M, N], block [BLOCK_M, BLOCK_N]. TMA zero-fills loads past the edges (a
        # ragged K tail adds zeros) and clips the store, so nothing here is masked.
        # SPLIT_K > 1 (split_k_for): each tile's 128-steps are cut into SPLIT_K consecutive ranges, one work item
        # each, whose fp32 sums go to partial_ptr[SPLIT_K, M, N] for the launcher to add up.
        start_pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        kb = tl.cdiv(K, 128)
        kb_per_split = tl.cdiv(kb, SPLIT_K)
        per_group = GROUP_M * num_n
        for work_id in tl.range(start_pid, num_m * num_n * SPLIT_K, NUM_SMS * OCC, flatten=FLATTEN):
            tile_id = work_id // SPLIT_K
            first_m = (tile_id // per_group) * GROUP_M
            group_m = min(num_m - first_m, GROUP_M)
            pid_m = first_m + (tile_id % per_group) % group_m
            pid_n = (tile_id % per_group) // group_m
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            # scale rows: wrapped into range (rows past the edge are computed on zeros, never stored)
            as_ptrs = as_ptr + ((off_m + tl.arange(0, BLOCK_M)) % M) * kb
            SCALAR_B: tl.constexpr = B_BLOCKWISE and BLOCK_N <= 128  # the tile sits in one 128-block of B
            if SCALAR_B:
                bs_ptrs = bs_ptr + (off_n // 128) * kb
            elif B_BLOCKWISE:
                bs_ptrs = bs_ptr + (((off_n + tl.arange(0, BLOCK_N)) % N) // 128) * kb
            else:
                bs_ptrs = bs_ptr + ((off_n + tl.arange(0, BLOCK_N)) % N) * kb
            if SPLIT_K == 1:
                acc = _tma_scaled_dot_loop(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, 0, kb, BLOCK_M, BLOCK_N,
                                           SCALAR_B)  # fmt: skip
                c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
            else:
                split = work_id % SPLIT_K
                kb_lo = split * kb_per_split
                acc = _tma_scaled_dot_loop(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, kb_lo,
                                           min(kb_lo + kb_per_split, kb), BLOCK_M, BLOCK_N, SCALAR_B)  # fmt: skip
                offs_m = off_m + tl.arange(0, BLOCK_M)
                offs_n = off_n + tl.arange(0, BLOCK_N)
                p_ptrs = partial_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
                tl.store(p_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _fp8_gemm_tma_kernel(
        a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K,
        B_BLOCKWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr, OCC: tl.constexpr, FLATTEN: tl.constexpr, partial_ptr=None, SPLIT_K: tl.constexpr = 1,
    ):  # fmt: skip
        # The same kernel without the autotuner: tuned configs launched directly, split-K, benchmark sweeps.
        _fp8_gemm_tma_body(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, B_BLOCKWISE, BLOCK_M, BLOCK_N, GROUP_M,
                           NUM_SMS, OCC, FLATTEN, partial_ptr, SPLIT_K)  # fmt: skip

    @triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "B_BLOCKWISE", "OUT_BITS"])
    @triton.jit
    def _fp8_gemm_tma_tuned(
        a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, M_BUCKET, OUT_BITS,
        B_BLOCKWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr, OCC: tl.constexpr, FLATTEN: tl.constexpr,
    ):  # fmt: skip
        _fp8_gemm_tma_body(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, B_BLOCKWISE, BLOCK_M, BLOCK_N, GROUP_M,
                           NUM_SMS, OCC, FLATTEN)  # fmt: skip


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


def _check_wgrad_fp8(x: torch.Tensor, s: torch.Tensor, name: str) -> None:
    """_check_fp8 for a weight-gradient operand: its 128x1 scales [rows, Tb] may also be a transposed view of
    step-major [Tb, rows] storage (quant.quantize_act_t's layout)."""
    _check_fp8(x, s.t() if s.dim() == 2 and s.t().is_contiguous() else s, name)


def m_bucket(m: int) -> int:
    """Autotune key for the token count: its power of two, so a new batch size rarely re-tunes."""
    return 1 << max(int(m) - 1, 0).bit_length()


@functools.cache
def num_sms(device_index: int | None = None) -> int:
    """Programs of a persistent launch: the SM count (a few under the interpreter, to exercise the tile loop)."""
    if tt.interpreting() or not torch.cuda.is_available():
        return 3
    return torch.cuda.get_device_properties(device_index or torch.cuda.current_device()).multi_processor_count


# Best TMA config per (token bucket, N, K, B blockwise, out dtype, device), filled by the autotuner's
# first call; later calls launch the un-autotuned kernel with it directly (less host time a call).
_TMA_BEST: dict = {}


def can_use_tma(*tensors: torch.Tensor) -> bool:
    """TMA (Hopper's bulk tensor copy) needs compute capability 9.0+, 16-byte aligned bases and row strides."""
    if tt.interpreting():
        ok = True
    else:
        cc = tt.capabilities().compute_capability
        ok = cc is not None and cc >= (9, 0) and all(t.is_cuda for t in tensors)
    return ok and all(t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def _tma_descs(a, b, c, bm=1, bn=1):
    # Block shapes are placeholders the autotuner's pre-hook replaces with the chosen config's.
    return (TensorDescriptor(a, list(a.shape), [a.shape[1], 1], [bm, 128]),
            TensorDescriptor(b, list(b.shape), [b.shape[1], 1], [bn, 128]),
            TensorDescriptor(c, list(c.shape), [c.shape[1], 1], [bm, bn]))  # fmt: skip


def launch_tma_config(a, a_s, b, b_s, b_blockwise, out_dtype, bm, bn, warps, stages, occ=1, flatten=True, group_m=8):
    """One explicit configuration of the TMA kernel (for benchmark sweeps; the launchers autotune)."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    nsm = num_sms()
    _fp8_gemm_tma_kernel[(min(nsm * occ, tiles),)](
        *_tma_descs(a, b, c, bm, bn), a_s, b_s, M, N, K, B_BLOCKWISE=b_blockwise, BLOCK_M=bm, BLOCK_N=bn,
        GROUP_M=group_m, NUM_SMS=nsm, OCC=occ, FLATTEN=flatten, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c


# Split-K, for the wgrad: its output dW[N, K] is small next to its reduction over all tokens. At deepseek-v3-small's
# widths a [672, 1024] dW is 88 tiles of 64x128 for 132 SMs, each walking 128 steps of 128 tokens; cut into 3 token
# ranges, the work fills the GPU (two programs an SM). The ranges' fp32 sums are added in a fixed order afterwards,
# so results do not vary from run to run. The config is the dense sweep's most frequent winner (TMA_CONFIGS[0]).
SPLIT_K_CONFIG = TMA_CONFIGS[0]
SPLIT_K_MIN_STEPS = 8  # 1024 tokens a range at least, so the extra pass over the fp32 partial sums stays small
# Measured on an H200 (benchmarks/bench_wgrad_split.py, 16384 tokens): 3 and 4 ranges took 1.43-1.51x less time
# ([672, 1024], [1536, 384], [2048, 256]); 2 ranges of a [1024, 1024] dW (128 tiles: every SM busy already) 0.96x.
SPLIT_K_MIN = 3


def split_k_for(tiles: int, kb: int, slots: int) -> int:
    """How many token ranges each of `tiles` output tiles is cut into so that the work items fill at most `slots`
    programs (resident at once: one wave, since a second, partial wave costs more than the split saves), each range
    at least SPLIT_K_MIN_STEPS steps of 128; 1 = no split (also below SPLIT_K_MIN). Every range is non-empty."""
    want = min(slots // tiles, kb // SPLIT_K_MIN_STEPS)
    if want < SPLIT_K_MIN:
        return 1
    return triton.cdiv(kb, triton.cdiv(kb, want))


def split_k_of(M: int, N: int, K: int, config=SPLIT_K_CONFIG) -> int:
    """split_k_for of C[M, N] = A[M, K] B[N, K]^T launched with `config` (TMA_CONFIGS' form) on this GPU."""
    bm, bn, *_, occ, _ = config
    return split_k_for(triton.cdiv(M, bm) * triton.cdiv(N, bn), triton.cdiv(K, BLOCK), num_sms() * occ)


def _launch_split_k(a, a_s, b, b_s, b_blockwise: bool, c: torch.Tensor, split_k: int, config=SPLIT_K_CONFIG):
    """C = A B^T with each tile's reduction cut into split_k ranges, summed in fp32 into c. config: one of
    TMA_CONFIGS' form (benchmarks/bench_wgrad_split.py --sweep times them all)."""
    M, K = a.shape
    N = b.shape[0]
    bm, bn, warps, stages, occ, flatten = config
    partial = torch.empty(split_k, M, N, dtype=torch.float32, device=a.device)
    nsm = num_sms()
    work = triton.cdiv(M, bm) * triton.cdiv(N, bn) * split_k
    _fp8_gemm_tma_kernel[(min(nsm * occ, work),)](
        *_tma_descs(a, b, c, bm, bn), a_s, b_s, M, N, K, B_BLOCKWISE=b_blockwise, BLOCK_M=bm, BLOCK_N=bn,
        GROUP_M=8, NUM_SMS=nsm, OCC=occ, FLATTEN=flatten, partial_ptr=partial, SPLIT_K=split_k, num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return torch.sum(partial, 0, out=c) if c.dtype == torch.float32 else c.copy_(partial.sum(0))


def _launch(
    a, a_s, b, b_s, b_blockwise: bool, out_dtype: torch.dtype, use_tma: bool | None = None, split_k: int | None = None
) -> torch.Tensor:
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
    if use_tma is None:
        # The one selection point. On an H100/H200, the warp-specialized Gluon kernel (fp8_gemm_gluon.py:
        # promotion overlapped with the tensor cores) where gluon_config says it was faster: B in 128x128 blocks
        # (forward, dgrad; 1.3-1.5x this file's TMA kernel on V3 shapes), and large wgrads (B per row) unless a
        # split is asked for; else a large wgrad over whole 128-token steps as the grouped wgrad's one aligned
        # expert; else the TMA kernel; else the pointer kernel. An explicit use_tma (benchmarks, tests) selects
        # among this file's kernels only.
        cfg = _gluon.gluon_config(M, N, K, b_blockwise, out_dtype) if b_blockwise or split_k is None else None
        if cfg is not None and _gluon.can_use_gluon(a, b, c):
            return _gluon.launch_gluon(a, a_s, b, b_s, b_blockwise, out_dtype, config=cfg, out=c)
        use_tma = can_use_tma(a, b, c)
        if use_tma and not b_blockwise and split_k is None and _wgrad_as_one_expert(M, N, K):
            from .fp8_grouped_gemm import fp8_grouped_gemm_wgrad  # that module imports this one

            offs = torch.full((1,), K, dtype=torch.int32, device=a.device)
            return fp8_grouped_gemm_wgrad(a, a_s, b, b_s, offs, out_dtype, tokens_aligned=True)[0]
    a_s, b_s = a_s.contiguous(), b_s.contiguous()  # [rows, Kb] as the kernels below index them (a wgrad's may not be)
    if use_tma:
        nsm = num_sms()
        if split_k is None and not b_blockwise:  # the wgrad (B scaled per row): split when its tiles are few
            split_k = split_k_of(M, N, K)
        if split_k is not None and split_k > 1:
            return _launch_split_k(a, a_s, b, b_s, b_blockwise, c, split_k)
        key = (m_bucket(M), N, K, b_blockwise, c.dtype, a.device)
        cfg = _TMA_BEST.get(key)
        if cfg is not None:  # tuned before: launch the plain kernel, skipping the autotuner's per-call work
            kw = cfg.kwargs
            bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
            _fp8_gemm_tma_kernel[(min(nsm * kw["OCC"], triton.cdiv(M, bm) * triton.cdiv(N, bn)),)](
                *_tma_descs(a, b, c, bm, bn), a_s, b_s, M, N, K, B_BLOCKWISE=b_blockwise, NUM_SMS=nsm, **kw,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            return c

        def grid_tma(meta):
            return (min(nsm * meta["OCC"], triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

        _fp8_gemm_tma_tuned[grid_tma](
            *_tma_descs(a, b, c), a_s, b_s, M, N, K, m_bucket(M), c.element_size() * 8,
            B_BLOCKWISE=b_blockwise, NUM_SMS=nsm,
        )  # fmt: skip
        _TMA_BEST[key] = _fp8_gemm_tma_tuned.best_config
        return c

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
    w_NK: torch.Tensor | None,
    w_scale_NbKb: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    w_KN: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx[M, K] = dy W from e4m3 dy (1x128 scales along N) and the forward's e4m3 W blocks.

    `w_KN`, if given, is W's N-major copy (`quantize_weight(..., transposed=True)` writes it in the
    same pass as W; w_NK may then be None); otherwise it is made here.
    """
    tt.require_fp8("fp8_gemm_dgrad")
    _check_fp8(dy_MN, dy_scale_MNb, "dy_MN")
    _check_fp8(w_NK if w_NK is not None else w_KN, w_scale_NbKb, "w_NK")
    # The reduction runs over N now, so W must become N-major (fp8 tensor-core operands are K-major):
    # a copy of N*K bytes; a 128x128 block's scale is the same in either orientation.
    if w_KN is None:
        w_KN = w_NK.t().contiguous()
    else:
        assert w_NK is None or (w_KN.shape == w_NK.shape[::-1] and w_KN.dtype == w_NK.dtype)
    return _launch(dy_MN, dy_scale_MNb, w_KN, w_scale_NbKb.t().contiguous(), True, out_dtype)


def fp8_gemm_wgrad(
    dyT_NM: torch.Tensor,
    dyT_scale_NMb: torch.Tensor,
    xT_KM: torch.Tensor,
    xT_scale_KMb: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    split_k: int | None = None,
) -> torch.Tensor:
    """dW[N, K] = dy^T x from both operands in the transposed 128x1 tiling (quantize_act_t).

    split_k: token ranges per output tile on the TMA path (None: _launch picks the kernel: on an H100/H200 the Gluon
    kernel for large outputs (gluon_config), else the grouped wgrad as one expert over whole 128-token steps
    (WGRAD_AS_ONE_EXPERT_MIN_TILES), else split_k_of(N, K, tokens) decides)."""
    tt.require_fp8("fp8_gemm_wgrad")
    _check_wgrad_fp8(dyT_NM, dyT_scale_NMb, "dyT_NM")
    _check_wgrad_fp8(xT_KM, xT_scale_KMb, "xT_KM")
    return _launch(dyT_NM, dyT_scale_NMb, xT_KM, xT_scale_KMb, False, out_dtype, split_k=split_k)


# The grouped wgrad's aligned loop (fp8_grouped_gemm: each step's scales read contiguous and loaded a step ahead,
# the store by TMA) also computes a dense wgrad, as one expert of all M tokens when M is a multiple of 128. On an
# H200 (benchmarks/bench_wgrad_split.py, RESULTS.md session 9; bit-identical results) it beat this file's TMA kernel
# 1.02-1.20x at 15 of 16 (shape, output dtype) cells where dW had at least 512 tiles of 64x128 (0.93x at the
# largest, bf16) and lost at 9 of 10 below that, where the dense kernel and its split-K rule stay.
WGRAD_AS_ONE_EXPERT_MIN_TILES = 512


def _wgrad_as_one_expert(N: int, K: int, M: int) -> bool:
    """Whether fp8_gemm_wgrad's dW[N, K] over M tokens runs as the grouped wgrad's one aligned expert."""
    tiles = triton.cdiv(N, 64) * triton.cdiv(K, 128)
    return M % BLOCK == 0 and M > 0 and tiles >= WGRAD_AS_ONE_EXPERT_MIN_TILES and split_k_of(N, K, M) == 1


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
