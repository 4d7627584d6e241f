"""Grouped block-scaled FP8 GEMM for MoE experts, forward and backward.

Tokens arrive sorted by expert; `offs_E` (int32) holds the cumulative token counts, so expert e
owns rows [offs_E[e-1], offs_E[e]) (torch._grouped_mm's convention). Experts with zero tokens
produce nothing in forward/dgrad and a zero weight gradient.

  forward  y[S, N]     = x[rows_e] . W[e]^T        W [E, N, K], weight_scale_inv [E, Nb, Kb]
  dgrad    dx[S, K]    = dy[rows_e] . W[e]         (W[e] transposed to N-major, same blocks)
  wgrad    dW[e][N, K] = dy[rows_e]^T . x[rows_e]  both in the 128x1 tiling along tokens

The wgrad's 128-token scale tiles are those of its operands' token axis. The routed experts
(fp8_linear.fp8_experts_forward) pad each expert's tokens with zeros to whole tiles
(fp8_linear.pad_experts_to_tiles, `tokens_aligned=True`): every step is one expert's, unmasked.
Unpadded operands (quant.quantize_act_t of all S rows) are valid too: a tile may then straddle two
experts, its scale covering both (valid, the scale multiplies back, only coarser), and the K-loop
masks the other experts' tokens.

Shape legend: S routed (token, expert) rows, E experts, N output features, K input features.
"""

from __future__ import annotations

import torch

from . import _triton as tt
from . import fp8_gemm_gluon as _gluon
from .fp8_gemm import _check_fp8, _check_wgrad_fp8, can_use_tma
from .quant import BLOCK, dequantize_act_ref, expand_block_scale

triton, tl = tt.triton, tt.tl
if tt.HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

# TMA grouped kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is fixed per launch (the
# tile -> expert map is built for it), so this is a list to sweep in benchmarks, not an autotune.
# Swept on an H200 (2026-11-30) at V3 gate_up (K = 7168) / down (K = 2048): 4 stages 673 / 688 TFLOPS,
# 3 stages 656 / 732; 128x128 / 8 warps 630 / 601; the pointer kernel 520 / 469.
GROUPED_TMA_CONFIG = (64, 128, 4, 4)
GROUPED_TMA_CONFIG_SHORT_K = (64, 128, 4, 3)
# Grouped wgrad TMA kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM, flatten loops[, TMA store]).
# On an H200 at V3 size (2026-11-30): 186 / 196 TFLOPS for gate_up / down, against 73 for the pointer kernel.
# Experts padded to whole tiles (tokens_aligned, session 8, `bench_grouped_wgrad.py --aligned`): 275 / 272 at 256
# rows an expert; the TMA store took V3 gate_up at 1024 rows an expert from 420 to 497 and left the other cases
# within about 1% (but deepseek-v3-small's down at 256 rows: 174 -> 159, one reading); 8 warps with 128x128 or
# 128x256 tiles, or 3 programs an SM, were slower everywhere. Then the aligned loop's scales loaded one step ahead
# and read transposed: V3 gate_up / down at 256 rows 14.0 -> 10.2 / 7.1 -> 5.6 ms, at 1024 rows 35.0 -> 28.3 /
# 15.6 -> 13.0 ms (593 TFLOPS); the transposed read is 4-26% of that (RESULTS.md). Capping registers to fit 3
# programs an SM (maxnreg 168) was slower.
GROUPED_WGRAD_TMA_CONFIG = (64, 128, 4, 3, 2, True, True)
# The persistent wgrad masks other experts' tokens out of a 128-token step in registers, which takes A off the
# tensor cores' shared-memory path. With MASK_ENDS_ONLY only the partial steps at an expert's two ends are masked
# and the whole ones run unmasked, at the cost of the FLATTEN pipelining across work items (three loops instead of
# one). Taken from this many routed rows an expert on average (S >= E * this). benchmarks/bench_grouped_wgrad.py on
# an H200 (2026-11-30, session 7), ends-only vs all-masked: 0.76-0.84x at 256 rows an expert, 0.92 / 1.01 at 512,
# 1.05 at 768, 1.10-1.18 at 1024-1536 (deepseek-v3-small at B=8, S=2048), 1.33 at 3072.
MASK_ENDS_ONLY_MIN_TOKENS = 768


def _grouped_configs() -> list:
    if tt.interpreting():
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(128, 4, 4), (128, 8, 3), (256, 8, 3)]
    ]


def _grouped_block_m() -> int:
    # Fixed (not autotuned) because the tile -> expert map is built for it before the launch.
    # 64 rows: V3 routes ~256 tokens to an expert at 8k tokens, so 128 would waste more padding.
    return 32 if tt.interpreting() else 64


def _wgrad_configs() -> list:
    if tt.interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4)]
    ]


if tt.HAS_TRITON:
    from .fp8_gemm import _scaled_dot_loop, _tma_scaled_dot_loop

    @triton.autotune(configs=_grouped_configs(), key=["N", "K", "B_BLOCKWISE"])
    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr,
        S, N, K,
        B_BLOCKWISE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # a_SK, c_SN contiguous; b_ENK; as_SKb; bs_ENbKb. One program: one BLOCK_M tile of one
        # expert's rows x one BLOCK_N tile of N. Programs past the last expert's tile exit at once.
        e = tl.load(tile_expert_ptr + tl.program_id(0))
        if e < 0:
            return
        row0 = tl.load(tile_row_ptr + tl.program_id(0))
        row_end = tl.load(offs_ptr + e)
        pid_n = tl.program_id(1)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kb = tl.cdiv(K, 128)
        nb = tl.cdiv(N, 128)
        # Rows past the expert's end read the next expert's tokens (or clamp at S-1): harmless, as
        # rows are independent and those rows are not stored.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _scaled_dot_loop(
            acc, a_ptr, b_ptr + e.to(tl.int64) * N * K, as_ptr, bs_ptr + e * nb * kb,
            tl.minimum(offs_m, S - 1), offs_n % N, 0, K, K, K, kb, kb,
            B_BLOCKWISE=B_BLOCKWISE, MASK_K=not EVEN_K, BLOCK_K=128,
        )  # fmt: skip
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))

    @triton.jit
    def _grouped_gemm_tma_kernel(
        a_desc, b_desc, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_expert_ptr, tile_row_ptr,
        S, N, K, NUM_N,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # a_desc over A[S, K] (block [BLOCK_M, 128]); b_desc over the stacked B[E*N, K] (block
        # [BLOCK_N, 128]); c_SN written with masked stores (a tile's rows past its expert's end
        # belong to the next expert). One program: one row tile x one N tile; the N tiles of a
        # row tile are neighbours in launch order, so the row tile (and its expert's weight,
        # shared by that expert's row tiles) is re-read from L2, not from memory.
        pid = tl.program_id(0)
        t = pid // NUM_N
        pid_n = pid % NUM_N
        e = tl.load(tile_expert_ptr + t)
        if e < 0:
            return
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(offs_ptr + e)
        kb = tl.cdiv(K, 128)
        nb = tl.cdiv(N, 128)
        off_n = pid_n * BLOCK_N
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        as_ptrs = as_ptr + tl.minimum(offs_m, S - 1) * kb
        SCALAR_B: tl.constexpr = BLOCK_N <= 128
        if SCALAR_B:
            bs_ptrs = bs_ptr + e * nb * kb + (off_n // 128) * kb
        else:
            bs_ptrs = bs_ptr + e * nb * kb + (tl.minimum(offs_n, N - 1) // 128) * kb
        acc = _tma_scaled_dot_loop(
            a_desc, b_desc, row0, e * N + off_n, as_ptrs, bs_ptrs, 0, kb, BLOCK_M, BLOCK_N, SCALAR_B
        )
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))

    @triton.jit
    def _wgrad_token_step(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, kb, lo, hi, MASK: tl.constexpr = True):
        """One 128-token step of the grouped wgrad (both kernels): the scaled product of the dy^T and x^T tiles at
        scale tile kb, counting only tokens lo <= t < hi (one expert's): the others are zeroed in the A tile (in
        registers), which zeroes their products whatever B holds there. MASK=False: every token of the tile is
        the expert's, and A goes from shared memory to the tensor cores untouched (no register round trip)."""
        a = a_desc.load([off_m, kb * 128])
        if MASK:
            tok = kb * 128 + tl.arange(0, 128)
            a = tl.where(((tok >= lo) & (tok < hi))[None, :], a, tl.zeros_like(a))
        b = b_desc.load([off_n, kb * 128])
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        return (tl.dot(a, b.T) * a_s[:, None]) * b_s[None, :]

    @triton.jit
    def _grouped_wgrad_tma_kernel(
        a_desc, b_desc, c_ptr, as_ptr, bs_ptr, offs_ptr,
        S, N, K, E,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr,
        MASK_ENDS_ONLY: tl.constexpr = False, ALIGNED: tl.constexpr = False, c_desc=None,
        TMA_STORE: tl.constexpr = False,
    ):  # fmt: skip
        # a_desc over dyT_NS (block [BLOCK_M, 128]), b_desc over xT_KS (block [BLOCK_N, 128]), both
        # K-major along tokens; as_NSb, bs_KSb; c = dW_ENK. Persistent: NUM_PROGS programs walk the
        # E * tiles work items (expert-major, so an expert's token columns stay in L2 while its tiles
        # run); each item reduces over its expert's tokens in steps aligned to the global 128-token
        # scale tiles. A step may straddle experts: the other experts' tokens are zeroed in the A
        # tile (in registers), which zeroes their products whatever B holds there; TMA zero-fills
        # tokens past S.
        num_m = tl.cdiv(N, BLOCK_M)
        num_n = tl.cdiv(K, BLOCK_N)
        tiles = num_m * num_n
        sb = tl.cdiv(S, 128)
        # Each item's token range is loaded one item ahead (a global load at an item's start would leave its
        # latency exposed: nothing else is in flight there).
        e_first = tl.program_id(0) // tiles
        start = tl.load(offs_ptr + e_first - 1, mask=e_first > 0, other=0)
        end = tl.load(offs_ptr + e_first)
        for item in tl.range(tl.program_id(0), E * tiles, NUM_PROGS, flatten=FLATTEN):
            e = item // tiles
            t = item % tiles
            off_m = (t // num_n) * BLOCK_M
            off_n = (t % num_n) * BLOCK_N
            e_next = tl.minimum((item + NUM_PROGS) // tiles, E - 1)
            start_next = tl.load(offs_ptr + e_next - 1, mask=e_next > 0, other=0)
            end_next = tl.load(offs_ptr + e_next)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if ALIGNED:  # every expert's tokens start and end on a scale tile: whole steps, one unmasked loop
                # The scales come transposed here, [Sb, N] and [Sb, K], so that a step's scale vectors are
                # contiguous, and are loaded one step ahead, for the same reason as the token range.
                as_ptrs = as_ptr + (off_m + tl.arange(0, BLOCK_M)) % N
                bs_ptrs = bs_ptr + (off_n + tl.arange(0, BLOCK_N)) % K
                kb_end = end // 128
                a_s = tl.load(as_ptrs + (start // 128) * N, mask=start < end, other=0.0)
                b_s = tl.load(bs_ptrs + (start // 128) * K, mask=start < end, other=0.0)
                for kb in range(start // 128, kb_end):
                    a_s_next = tl.load(as_ptrs + (kb + 1) * N, mask=kb + 1 < kb_end, other=0.0)
                    b_s_next = tl.load(bs_ptrs + (kb + 1) * K, mask=kb + 1 < kb_end, other=0.0)
                    a = a_desc.load([off_m, kb * 128])
                    b = b_desc.load([off_n, kb * 128])
                    acc += (tl.dot(a, b.T) * a_s[:, None]) * b_s[None, :]
                    a_s, b_s = a_s_next, b_s_next
            else:  # scales [N, Sb] and [K, Sb]; other experts' tokens in a step are masked (_wgrad_token_step)
                as_ptrs = as_ptr + ((off_m + tl.arange(0, BLOCK_M)) % N) * sb
                bs_ptrs = bs_ptr + ((off_n + tl.arange(0, BLOCK_N)) % K) * sb
                if MASK_ENDS_ONLY:
                    # The scale tiles wholly inside the expert's tokens need no mask; the partial ones at its two
                    # ends (at most two steps, one where both ends share a tile) do.
                    for kb in range(tl.cdiv(start, 128), end // 128):
                        acc += _wgrad_token_step(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, kb, start, end,
                                                 False)  # fmt: skip
                    if start % 128 != 0:
                        acc += _wgrad_token_step(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, start // 128, start,
                                                 end)  # fmt: skip
                    if (end % 128 != 0) & ((end // 128 != start // 128) | (start % 128 == 0)):
                        acc += _wgrad_token_step(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, end // 128, start,
                                                 end)  # fmt: skip
                else:  # one loop, every step masked: what FLATTEN can pipeline across work items
                    for kb in range(start // 128, tl.cdiv(end, 128)):
                        acc += _wgrad_token_step(a_desc, b_desc, off_m, off_n, as_ptrs, bs_ptrs, kb, start, end)
            # An expert with no tokens runs no step (or only masked ones) and stores zeros.
            if TMA_STORE:  # c_desc over dW [E, N, K], block [1, BLOCK_M, BLOCK_N]: clipped at N and K by the TMA
                c_desc.store([e, off_m, off_n], acc.to(c_desc.dtype).reshape(1, BLOCK_M, BLOCK_N))
            else:
                offs_m = off_m + tl.arange(0, BLOCK_M)
                offs_n = off_n + tl.arange(0, BLOCK_N)
                c_ptrs = c_ptr + e.to(tl.int64) * N * K + offs_m[:, None] * K + offs_n[None, :]
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_n[None, :] < K))
            start, end = start_next, end_next

    @triton.autotune(configs=_wgrad_configs(), key=["N", "K"])
    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offs_ptr,
        S, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # a = dyT_NS, b = xT_KS (both K-major along tokens S), as_NSb, bs_KSb; c = dW_ENK.
        # One program: one [BLOCK_M, BLOCK_N] tile of one expert's dW, reducing over its tokens.
        e = tl.program_id(1)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        num_n = tl.cdiv(K, BLOCK_N)
        pid_m = tl.program_id(0) // num_n
        pid_n = tl.program_id(0) % num_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sb = tl.cdiv(S, 128)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _scaled_dot_loop(
            acc, a_ptr, b_ptr, as_ptr, bs_ptr, offs_m % N, offs_n % K, start, end, S, S, sb, sb,
            B_BLOCKWISE=False, MASK_K=True, BLOCK_K=128,
        )  # fmt: skip
        # An expert with no tokens runs no step and stores zeros: its weight gradient is zero.
        c_ptrs = c_ptr + e.to(tl.int64) * N * K + offs_m[:, None] * K + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_n[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Launchers


if tt.HAS_TRITON:

    @triton.jit
    def _tile_map_kernel(offs_ptr, expert_ptr, row_ptr, E, T, BLOCK_M: tl.constexpr, E_P2: tl.constexpr,
                         BLOCK_T: tl.constexpr):  # fmt: skip
        # _tile_map_ref in one launch: every program reads the E offsets, each writes BLOCK_T tile ids' entries.
        e = tl.arange(0, E_P2)
        e_ok = e < E
        ends = tl.load(offs_ptr + e, mask=e_ok, other=0)
        starts = tl.load(offs_ptr + e - 1, mask=e_ok & (e > 0), other=0)
        tiles = tl.where(e_ok, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        cum = tl.cumsum(tiles, 0)  # inclusive: expert e's tiles are ids cum[e] - tiles[e] .. cum[e] - 1
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        expert = tl.sum(((cum[None, :] <= t[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)  # searchsorted, right
        mine = e[None, :] == expert[:, None]  # [BLOCK_T, E_P2], one True a tile id (none past the last tile)
        start = tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
        first = tl.sum(tl.where(mine, (cum - tiles)[None, :], 0), axis=1)
        valid = expert < E
        tl.store(expert_ptr + t, tl.where(valid, expert, -1), mask=t < T)
        tl.store(row_ptr + t, tl.where(valid, start + (t - first) * BLOCK_M, 0), mask=t < T)


def _tile_rows(E: int, S: int, block_m: int) -> int:
    """The static number of row tiles: each expert's rows are cut into ceil(count / block_m) tiles, at most
    ceil(S / block_m) + min(E, S) in all (a partial tile at most for each expert with rows, and at most S experts have
    rows). The min matters at decoding's few rows: at V3's 8 routed rows a token, 9 row tiles instead of 257, each
    N / BLOCK_N programs of the launch, the idle ones returning at once."""
    return triton.cdiv(S, block_m) + min(E, S)


def _tile_map(offs_E: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row-tile: its expert (-1 for the idle tail) and first row, built on the device (no sync) by one kernel
    (the torch form, _tile_map_ref, is a dozen launches: at decoding's few rows they cost more than the GEMM's
    idle programs)."""
    E, T = offs_E.numel(), _tile_rows(offs_E.numel(), S, block_m)
    expert = torch.empty(T, dtype=torch.int32, device=offs_E.device)
    row = torch.empty(T, dtype=torch.int32, device=offs_E.device)
    if T:
        block_t = 64
        _tile_map_kernel[(triton.cdiv(T, block_t),)](offs_E, expert, row, E, T, BLOCK_M=block_m,
                                                     E_P2=max(16, triton.next_power_of_2(E)), BLOCK_T=block_t)  # fmt: skip
    return expert, row


def _tile_map_ref(offs_E: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_tile_map in torch ops (its reference)."""
    E = offs_E.numel()
    offs = offs_E.long()
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    tiles = (offs - starts + block_m - 1) // block_m  # [E]
    cum = torch.cumsum(tiles, 0)  # [E]
    tile_ids = torch.arange(_tile_rows(E, S, block_m), device=offs_E.device)  # [T]
    expert = torch.searchsorted(cum, tile_ids, right=True)  # [T], E for idle tiles
    valid = expert < E
    e_safe = expert.clamp(max=E - 1)
    row0 = starts[e_safe] + (tile_ids - (cum[e_safe] - tiles[e_safe])) * block_m
    return torch.where(valid, e_safe, -1).int(), torch.where(valid, row0, 0).int()


def _check_offs(offs_E: torch.Tensor, E: int) -> None:
    assert offs_E.dtype == torch.int32 and offs_E.dim() == 1 and offs_E.numel() == E, "offs_E must be int32 [E]"


def _grouped_launch(a_SK, a_s, b_ENK, b_s, offs_E, out_dtype, use_tma=None, config=None) -> torch.Tensor:
    S, K = a_SK.shape
    E, N, Kw = b_ENK.shape
    assert Kw == K, f"reduction dims differ: {K} vs {Kw}"
    Kb, Nb = triton.cdiv(K, BLOCK), triton.cdiv(N, BLOCK)
    assert a_s.shape == (S, Kb) and b_s.shape == (E, Nb, Kb), "scales must be [S, Kb] and [E, Nb, Kb]"
    _check_offs(offs_E, E)
    c = torch.empty(S, N, dtype=out_dtype, device=a_SK.device)
    if S == 0 or N == 0:
        return c
    if use_tma is None:
        # The one selection point: on an H100/H200 from 4096 rows, the warp-specialised Gluon kernel
        # (fp8_gemm_gluon.launch_gluon_grouped; 1.04-1.24x the TMA kernel below at V3 size); else the TMA
        # kernel; else the pointer kernel. An explicit use_tma (benchmarks, tests) picks among this file's.
        gluon_cfg = _gluon.gluon_grouped_config(S, out_dtype)
        if (gluon_cfg is not None and b_ENK.is_contiguous() and offs_E.is_cuda
                and _gluon.can_use_gluon(a_SK, b_ENK.view(E * N, K), c)):  # fmt: skip  # B as the kernel reads it
            return _gluon.launch_gluon_grouped(a_SK, a_s, b_ENK, b_s, offs_E, out_dtype, config=gluon_cfg, out=c)
        use_tma = can_use_tma(a_SK, b_ENK)
    if use_tma:
        if config is None:
            config = (
                (32, 64, 4, 1) if tt.interpreting() else GROUPED_TMA_CONFIG if K > 4096 else GROUPED_TMA_CONFIG_SHORT_K
            )
        bm, bn, warps, stages = config
        tile_expert, tile_row = _tile_map(offs_E, S, bm)
        num_n = triton.cdiv(N, bn)
        a_desc = TensorDescriptor(a_SK, [S, K], [K, 1], [bm, 128])
        b_desc = TensorDescriptor(b_ENK, [E * N, K], [K, 1], [bn, 128])
        _grouped_gemm_tma_kernel[(tile_expert.numel() * num_n,)](
            a_desc, b_desc, c, a_s, b_s, offs_E, tile_expert, tile_row, S, N, K, num_n,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return c
    block_m = _grouped_block_m()
    tile_expert, tile_row = _tile_map(offs_E, S, block_m)

    def grid(meta):
        return (tile_expert.numel(), triton.cdiv(N, meta["BLOCK_N"]))

    _grouped_gemm_kernel[grid](
        a_SK, b_ENK, c, a_s, b_s, offs_E, tile_expert, tile_row, S, N, K,
        B_BLOCKWISE=True, EVEN_K=K % BLOCK == 0, BLOCK_M=block_m,
    )  # fmt: skip
    return c


def fp8_grouped_gemm(
    x_SK: torch.Tensor,
    x_scale_SKb: torch.Tensor,
    w_ENK: torch.Tensor,
    w_scale_ENbKb: torch.Tensor,
    offs_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y[S, N]: each expert's rows of e4m3 x (1x128 scales) times its e4m3 W[e]^T (128x128 blocks)."""
    tt.require_fp8("fp8_grouped_gemm")
    _check_fp8(x_SK, x_scale_SKb, "x_SK")
    _check_fp8(w_ENK, w_scale_ENbKb, "w_ENK")
    return _grouped_launch(x_SK, x_scale_SKb, w_ENK, w_scale_ENbKb, offs_E, out_dtype)


def fp8_grouped_gemm_dgrad(
    dy_SN: torch.Tensor,
    dy_scale_SNb: torch.Tensor,
    w_ENK: torch.Tensor | None,
    w_scale_ENbKb: torch.Tensor,
    offs_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    w_EKN: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx[S, K]: each expert's rows of e4m3 dy (1x128 scales along N) times its W[e].

    `w_EKN`, if given, is the weights' N-major copy (`quantize_weight(..., transposed=True)`; w_ENK
    may then be None).
    """
    tt.require_fp8("fp8_grouped_gemm_dgrad")
    _check_fp8(dy_SN, dy_scale_SNb, "dy_SN")
    _check_fp8(w_ENK if w_ENK is not None else w_EKN, w_scale_ENbKb, "w_ENK")
    # N-major copy of the weights ([E, K, N]) so the reduction dim is contiguous (fp8 wgmma).
    if w_EKN is None:
        w_EKN = w_ENK.transpose(1, 2).contiguous()
    else:
        assert w_ENK is None or w_EKN.shape == w_ENK.transpose(1, 2).shape
    return _grouped_launch(dy_SN, dy_scale_SNb, w_EKN, w_scale_ENbKb.transpose(1, 2).contiguous(), offs_E, out_dtype)


def fp8_grouped_gemm_wgrad(
    dyT_NS: torch.Tensor,
    dyT_scale_NSb: torch.Tensor,
    xT_KS: torch.Tensor,
    xT_scale_KSb: torch.Tensor,
    offs_E: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    use_tma: bool | None = None,
    config: tuple | None = None,
    mask_ends_only: bool | None = None,
    tokens_aligned: bool = False,
) -> torch.Tensor:
    """dW[E, N, K]: per expert, dy^T x over its tokens, both in the 128x1 tiling along tokens.

    mask_ends_only: the persistent TMA kernel's loop (MASK_ENDS_ONLY_MIN_TOKENS; None = that rule). tokens_aligned: the caller promises that every
    offs_E is a multiple of 128 (each expert's tokens padded to whole scale tiles), so the persistent TMA kernel
    runs whole steps only, unmasked, in one loop. Not checked here (that would sync with the device)."""
    tt.require_fp8("fp8_grouped_gemm_wgrad")
    _check_wgrad_fp8(dyT_NS, dyT_scale_NSb, "dyT_NS")
    _check_wgrad_fp8(xT_KS, xT_scale_KSb, "xT_KS")
    (N, S), K, E = dyT_NS.shape, xT_KS.shape[0], offs_E.numel()
    Sb = triton.cdiv(S, BLOCK)
    assert xT_KS.shape[1] == S and dyT_scale_NSb.shape == (N, Sb) and xT_scale_KSb.shape == (K, Sb)
    _check_offs(offs_E, E)
    c = torch.empty(E, N, K, dtype=out_dtype, device=dyT_NS.device)
    if E == 0 or N == 0 or K == 0:
        return c
    if S == 0:  # no routed tokens (TMA cannot describe an empty operand): every expert's gradient is zero
        return c.zero_()

    if use_tma is None:
        # The selection point: experts padded to whole tiles on an H100/H200, the Gluon kernel
        # (fp8_gemm_gluon.launch_gluon_grouped_wgrad: the scales come by TMA, the promotion overlaps the tensor
        # cores) where gluon_grouped_wgrad_config says; else the TMA kernel below; else the pointer kernel.
        # An explicit use_tma (benchmarks, tests) picks among this file's.
        gluon_cfg = _gluon.gluon_grouped_wgrad_config(N, K, out_dtype) if tokens_aligned and config is None else None
        if gluon_cfg is not None and offs_E.is_cuda and _gluon.can_use_gluon(dyT_NS, xT_KS, c.view(E * N, K)):
            return _gluon.launch_gluon_grouped_wgrad(dyT_NS, dyT_scale_NSb, xT_KS, xT_scale_KSb, offs_E, out_dtype,
                                                     config=gluon_cfg)  # fmt: skip
        use_tma = can_use_tma(dyT_NS, xT_KS)
    # The TMA kernel's aligned loop reads the scales step-major, [Sb, N] / [Sb, K] (quant.quantize_act_t's storage:
    # no copy); its masked loop and the pointer kernel as [N, Sb] / [K, Sb].
    if use_tma and tokens_aligned:
        dyT_scale_NSb, xT_scale_KSb = dyT_scale_NSb.t().contiguous(), xT_scale_KSb.t().contiguous()
    else:
        dyT_scale_NSb, xT_scale_KSb = dyT_scale_NSb.contiguous(), xT_scale_KSb.contiguous()
    if use_tma:
        bm, bn, warps, stages, occ, flatten, *extra = config or (
            GROUPED_WGRAD_TMA_CONFIG if not tt.interpreting() else (32, 64, 4, 1, 1, False)
        )
        tma_store = bool(extra and extra[0])
        c_desc = TensorDescriptor(c, [E, N, K], [N * K, K, 1], [1, bm, bn]) if tma_store else None
        from .fp8_gemm import num_sms

        progs = min(num_sms() * occ, E * triton.cdiv(N, bm) * triton.cdiv(K, bn))
        a_desc = TensorDescriptor(dyT_NS, [N, S], [S, 1], [bm, 128])
        b_desc = TensorDescriptor(xT_KS, [K, S], [S, 1], [bn, 128])
        if mask_ends_only is None:
            mask_ends_only = S >= E * MASK_ENDS_ONLY_MIN_TOKENS
        _grouped_wgrad_tma_kernel[(progs,)](
            a_desc, b_desc, c, dyT_scale_NSb, xT_scale_KSb, offs_E, S, N, K, E,
            BLOCK_M=bm, BLOCK_N=bn, NUM_PROGS=progs, FLATTEN=flatten, MASK_ENDS_ONLY=mask_ends_only,
            ALIGNED=tokens_aligned, c_desc=c_desc, TMA_STORE=tma_store, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return c

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]), E)

    _grouped_wgrad_kernel[grid](dyT_NS, xT_KS, c, dyT_scale_NSb, xT_scale_KSb, offs_E, S, N, K)
    return c


# ---------------------------------------------------------------------------------------------
# Torch references: a loop over experts, dequantise then matmul in fp32


def _expert_ranges(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def _dequant_w(w_NK: torch.Tensor, s_NbKb: torch.Tensor) -> torch.Tensor:
    return w_NK.float() * expand_block_scale(s_NbKb.float(), *w_NK.shape)


def fp8_grouped_gemm_ref(x_SK, x_scale_SKb, w_ENK, w_scale_ENbKb, offs_E, out_dtype=torch.bfloat16):
    x = dequantize_act_ref(x_SK, x_scale_SKb)
    y = x.new_zeros(x.shape[0], w_ENK.shape[1])
    for e, (s, t) in enumerate(_expert_ranges(offs_E)):
        y[s:t] = x[s:t] @ _dequant_w(w_ENK[e], w_scale_ENbKb[e]).t()
    return y.to(out_dtype)


def fp8_grouped_gemm_dgrad_ref(dy_SN, dy_scale_SNb, w_ENK, w_scale_ENbKb, offs_E, out_dtype=torch.bfloat16):
    dy = dequantize_act_ref(dy_SN, dy_scale_SNb)
    dx = dy.new_zeros(dy.shape[0], w_ENK.shape[2])
    for e, (s, t) in enumerate(_expert_ranges(offs_E)):
        dx[s:t] = dy[s:t] @ _dequant_w(w_ENK[e], w_scale_ENbKb[e])
    return dx.to(out_dtype)


def fp8_grouped_gemm_wgrad_ref(dyT_NS, dyT_scale_NSb, xT_KS, xT_scale_KSb, offs_E, out_dtype=torch.float32):
    dyT, xT = dequantize_act_ref(dyT_NS, dyT_scale_NSb), dequantize_act_ref(xT_KS, xT_scale_KSb)
    dw = dyT.new_zeros(offs_E.numel(), dyT.shape[0], xT.shape[0])
    for e, (s, t) in enumerate(_expert_ranges(offs_E)):
        dw[e] = dyT[:, s:t] @ xT[:, s:t].t()
    return dw.to(out_dtype)
