"""Block-scaled FP8 (e4m3) quantisation, as in DeepSeek-V3 (arXiv 2412.19437, sec. 3.3.2).

Activations are scaled per token in 1x128 tiles; the weight-gradient GEMM reduces over tokens, so
it needs the transposed 128x1 tiling (128 consecutive tokens of one channel share a scale); weights
are scaled in 128x128 blocks, with `weight_scale_inv` laid out exactly as the official checkpoints
store it. Every stored scale *multiplies back*: x ~= x_fp8 * scale.

Shape legend: M tokens (rows), K reduction / input features, N output features; Mb, Kb, Nb are
ceil(dim / 128), the number of 128-wide scale blocks along that dim. `x_MK` is [M, K].

The float -> e4m3 rounding is done by explicit round-to-nearest-even arithmetic (`_round_e4m3`),
then the exactly representable value is cast. The result is the same bits as the hardware cast
(and as torch's `.to(torch.float8_e4m3fn)`), and it is also right under TRITON_INTERPRET=1, whose
own float->fp8 cast is wrong when rounding carries into the next power of two (127.9 -> 64
instead of 128) and for sub-half-ulp subnormals.
"""

from __future__ import annotations

import torch

from . import _triton as tt

FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128  # scale-block width: the paper's tile and the official checkpoints' weight blocks
AMAX_EPS = 1e-4  # an all-zero tile gets a tiny scale instead of 0 (0 would make x / scale NaN)

triton, tl = tt.triton, tt.tl

if tt.HAS_TRITON:
    # jit functions may read module globals only when they are tl.constexpr
    _FP8_MAX_C = tl.constexpr(FP8_MAX)
    _AMAX_EPS_C = tl.constexpr(AMAX_EPS)
    _INV_FP8_MAX_C = tl.constexpr(1.0 / FP8_MAX)  # fp32 rounds it to RN(1/448): 1/7's bits never tie

    @triton.jit
    def _round_e4m3(v):
        """Round fp32 `v` (|v| <= 448) to the nearest e4m3 value, ties to even, exactly."""
        a = tl.abs(v)
        # e4m3 has 3 mantissa bits, so the spacing in binade [2^e, 2^(e+1)) is 2^(e-3);
        # subnormals (below 2^-6) share the spacing 2^-9 of the lowest normal binade.
        e_biased = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e_biased = tl.maximum(e_biased, 127 - 6)
        quantum = ((e_biased - 3) << 23).to(tl.float32, bitcast=True)
        inv_quantum = ((257 - e_biased) << 23).to(tl.float32, bitcast=True)
        # a * 2^-(e-3) is exact; adding then subtracting 1.5 * 2^23 rounds it to an integer with the
        # FPU's round-to-nearest-even (valid below 2^22; here it is below 2^5). A carry (15.99 -> 16)
        # lands on the next power of two, which is representable: this is the case the
        # interpreter's own cast gets wrong.
        r = (a * inv_quantum + 12582912.0) - 12582912.0
        r = (r * quantum).to(tl.int32, bitcast=True)
        # Copy the sign bit back with bit ops: `-r` is `0 - r` in Triton, which turns -0.0 into +0.0
        # (the hardware cast keeps -0.0, code 0x80).
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        return (r | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_from_amax(amax, POW2: tl.constexpr, FAST_DIV: tl.constexpr = False):
        # FAST_DIV: amax / 448 by _div with 1/448 as a constant, where div.rn costs a reciprocal and a branch per
        # scale. Markstein's theorem holds for every normal amax (all of them are, from AMAX_EPS up), and a check
        # of every fp32 mantissa of one binade (the quotient scales with amax's exponent) found no difference
        # from the correctly rounded quotient.
        if FAST_DIV:
            s = _div(tl.maximum(amax, _AMAX_EPS_C), _FP8_MAX_C, _INV_FP8_MAX_C, True)
        else:
            s = tl.math.div_rn(tl.maximum(amax, _AMAX_EPS_C), _FP8_MAX_C)
        if POW2:
            # UE8M0: round the scale *up* to a power of two (x / s then stays within +-448).
            bits = s.to(tl.int32, bitcast=True)
            up = (bits & 0x7F800000) + 0x00800000
            s = tl.where((bits & 0x007FFFFF) != 0, up, bits).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _div(x, s, inv_s, FAST_DIV: tl.constexpr):
        """x / s correctly rounded (as torch divides). FAST_DIV: Markstein's correction of x * (1/s)
        with 1/s correctly rounded (computed once per scale by the caller): q = x*r; e = x - q*s
        (exact by FMA); q + e*r rounds to the correctly rounded quotient (Handbook of Floating-Point
        Arithmetic, Markstein's theorem) in 3 instructions instead of the ~10 and branch of div.rn.
        It needs a true FMA, so the interpreter (numpy) takes div_rn. The residual negates s, not q:
        `-q` is `0 - q` in Triton, an FFMA of its own a quotient (ptxas computed x * r twice), where
        -s is one value a scale (128 FFMA of the 128x1 kernel's 2008 SASS instructions for sm_90a)."""
        if FAST_DIV:
            q = x * inv_s
            e = tl.fma(q, -s, x)
            return tl.fma(e, inv_s, q)
        else:
            return tl.math.div_rn(x, s)

    @triton.jit
    def _to_e4m3(v, EXACT: tl.constexpr):
        # The hardware cast (cvt.rn.satfinite.e4m3x2.f32) rounds to nearest even, like torch. The
        # interpreter's does not (see the module docstring), so there the exact arithmetic rounds
        # first and the cast only converts a representable value.
        if EXACT:
            v = _round_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _quantize_rows(x, POW2: tl.constexpr, FAST_DIV: tl.constexpr, EXACT: tl.constexpr):
        """x [rows, 128] in fp32 (masked lanes 0), each row one 1x128 tile: (e4m3 codes, a scale a row). The 1x128
        tiling of quantize_act's kernel and of the SwiGLU kernels that quantise their output (swiglu.py)."""
        s = _scale_from_amax(tl.max(tl.abs(x), axis=1), POW2, FAST_DIV)
        return _to_e4m3(_div(x, s[:, None], tl.math.div_rn(1.0, s)[:, None], FAST_DIV), EXACT), s

    @triton.jit
    def _round_to(v, DTYPE: tl.constexpr):
        """fp32 v rounded to DTYPE (to nearest, ties to even) and returned as fp32. For bf16 by integer arithmetic,
        because the interpreter's fp32 -> bf16 cast truncates (and its "rtne" mode rounds ties up and loses the
        carry into the exponent; Triton 3.6), so a cast would give other bits there than on the GPU."""
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keeps NaN and inf; overflow rounds to inf
            return bits.to(tl.float32, bitcast=True)
        elif DTYPE == tl.float32:
            return v
        else:
            return v.to(DTYPE).to(tl.float32)

    @triton.jit
    def _load_rows(
        x_ptr, rows_ptr, mult_ptr, offs_m, offs_k, M, K, GATHER: tl.constexpr, MULT: tl.constexpr, EXACT: tl.constexpr
    ):  # fmt: skip
        """Rows offs_m of X = x[rows] * mult[:, None] as fp32 (see _quant_launch); masked lanes are 0."""
        mask_m = offs_m < M
        mask = mask_m[:, None] & (offs_k[None, :] < K)  # ragged last tile: what the caller stores
        load_mask = mask
        src_m = offs_m
        if GATHER:  # a row index of -1 is a padding row: zeros (stored like any other row)
            src_m = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
            load_mask = mask & (src_m >= 0)[:, None]
        x = tl.load(x_ptr + src_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=load_mask, other=0.0)
        x = x.to(tl.float32)
        if MULT:  # the product rounded to x's dtype, as torch's `x * mult` stores it
            mult = tl.load(mult_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            x = _round_mult(x * mult[:, None], x_ptr.dtype.element_ty, EXACT)
        return x, mask

    @triton.jit
    def _round_mult(v, DTYPE: tl.constexpr, EXACT: tl.constexpr):
        """fp32 v rounded to DTYPE, as fp32: on a GPU by the hardware cast (round to nearest even), under the
        interpreter (EXACT) by _round_to's integer arithmetic, the same bits. The cast is 2 instructions where the
        arithmetic is 6 for bf16, and instruction issue holds these kernels more than memory: on an H200 it took
        the 128x1 tiling of the routed experts' scaled output gradient from 669 to 540 us at V3 size
        (benchmarks/RESULTS.md, session 17)."""
        if EXACT:
            return _round_to(v, DTYPE)
        return v.to(DTYPE).to(tl.float32)

    @triton.jit
    def _quant_act_kernel(
        x_ptr, rows_ptr, mult_ptr, y_ptr, s_ptr, yt_ptr, st_ptr, M, K,
        ROW: tl.constexpr, COL: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FAST_DIV: tl.constexpr = False,
        GATHER: tl.constexpr = False, MULT: tl.constexpr = False,
    ):  # fmt: skip
        # One program: a [BLOCK_M tokens, BLOCK_K channels] tile of X (x_MK, or x gathered: _load_rows).
        # ROW: the 1x128 tiling (BLOCK_K = 128): y_MK and s_MKb, a scale per token.
        # COL: the 128x1 tiling (BLOCK_M = 128): yT_KM transposed, so that the wgrad GEMM reads its
        #      reduction dim (tokens) contiguously (fp8 tensor-core operands must be K-major), and
        #      sT_KMb, a scale per channel, stored step-major (sT_MbK: see quantize_act_t).
        # The launchers set one of the two (see quantize_act_both for why not both).
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x, mask = _load_rows(x_ptr, rows_ptr, mult_ptr, offs_m, offs_k, M, K, GATHER, MULT, EXACT)
        if ROW:
            y, s = _quantize_rows(x, POW2, FAST_DIV, EXACT)  # s: [BLOCK_M]
            tl.store(y_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], y, mask=mask)
            tl.store(s_ptr + offs_m * tl.cdiv(K, 128) + pid_k, s, mask=offs_m < M)
        if COL:
            st = _scale_from_amax(tl.max(tl.abs(x), axis=0), POW2, FAST_DIV)  # [BLOCK_K]
            yt = _to_e4m3(_div(x, st[None, :], tl.math.div_rn(1.0, st)[None, :], FAST_DIV), EXACT)
            tl.store(yt_ptr + offs_k[None, :].to(tl.int64) * M + offs_m[:, None], yt, mask=mask)
            tl.store(st_ptr + pid_m * K + offs_k, st, mask=offs_k < K)  # step-major: see quantize_act_t

    @triton.jit
    def _quant_weight_kernel(
        w_ptr, y_ptr, s_ptr, yt_ptr, N, K, POW2: tl.constexpr, EXACT: tl.constexpr, TRANS: tl.constexpr,
        FAST_DIV: tl.constexpr = False,
    ):  # fmt: skip
        # One program: one 128x128 block of w_NK (of expert program_id(2) for stacked w_ENK);
        # s_NbKb is the checkpoints' weight_scale_inv. TRANS also writes the block into the
        # K-major copy yT_KN (what dgrad reads), from the same registers.
        nb = tl.program_id(0)
        kb = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        w_ptr += e * N * K
        y_ptr += e * N * K
        s_ptr += e * tl.cdiv(N, 128) * tl.cdiv(K, 128)
        offs_n = nb * 128 + tl.arange(0, 128)
        offs_k = kb * 128 + tl.arange(0, 128)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2, FAST_DIV)
        y = _to_e4m3(_div(w, s, tl.math.div_rn(1.0, s), FAST_DIV), EXACT)
        tl.store(y_ptr + offs_n[:, None] * K + offs_k[None, :], y, mask=mask)
        if TRANS:
            yt_ptr += e * N * K
            tl.store(yt_ptr + offs_k[None, :] * N + offs_n[:, None], y, mask=mask)
        tl.store(s_ptr + nb * tl.cdiv(K, 128) + kb, s)

    @triton.jit
    def _dequant_weight_kernel(q_ptr, s_ptr, w_ptr, N, K):
        nb = tl.program_id(0)
        kb = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        q_ptr += e * N * K
        w_ptr += e * N * K
        s_ptr += e * tl.cdiv(N, 128) * tl.cdiv(K, 128)
        offs_n = nb * 128 + tl.arange(0, 128)
        offs_k = kb * 128 + tl.arange(0, 128)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        q = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + nb * tl.cdiv(K, 128) + kb)
        tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], (q * s).to(w_ptr.dtype.element_ty), mask=mask)


# Gluon (Triton's explicit-layout dialect) versions of the two transposed stores, for the GPU only
# (the interpreter cannot run Gluon; it keeps the @triton.jit kernels above, which compute the same
# bits). The load wants each thread to hold consecutive *channels* (16-byte loads along K), the
# transposed store consecutive *tokens* (16-byte stores along M). Plain Triton gives each op its own
# layout ([1, 8] vs [16, 1] elements a thread) and converts between them through shared memory one
# byte at a time (64 STS.U8 a thread at the old (128, 64, 4) tile). Here each thread holds an
# [SPT_M tokens x SPT_K channels] block and the load and store layouts differ only in the order of a
# thread's registers (_transpose_layout), so the transpose happens in registers: no shared memory,
# and at (16, 8, 8, 1, 4) no barrier either (one warp spans the 128 tokens of a scale). Both access
# widths count: with all 32 lanes along K (each lane alone on its output row) the same kernel ran at
# 16-64% of copy bandwidth; with 8 lanes along M (128 contiguous bytes a row a store) at 83%.
HAS_GLUON = False
if tt.gluon_validated():  # other Triton versions: the @triton.jit kernels (see _triton.py)
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl

        HAS_GLUON = True
    except Exception:  # an older Triton without Gluon: the @triton.jit kernels serve everywhere
        pass

if HAS_GLUON:

    @gluon.constexpr_function
    def _transpose_layout(spt_m, spt_k, tpw_m, warps_m, warps_k, tokens_first, rows=128):
        """A Gluon linear layout of a [rows, BLOCK_K] tile; the two calls (tokens_first False, True)
        give two layouts equal but for the order of each thread's registers: channels first (a
        thread's loads are SPT_K*2 contiguous bytes) or tokens first (its transposed stores are SPT_M
        contiguous bytes), so converting between them moves nothing. Lanes: 32/TPW_M along channels,
        then TPW_M along tokens (a warp instruction touches TPW_M*SPT_M contiguous bytes of each output
        row and (32/TPW_M)*SPT_K*2 of each input row); warps: WARPS_M along tokens, then WARPS_K along
        channels. Built at compile time from the integer constexprs."""
        tpw_k = 32 // tpw_m
        assert spt_m * tpw_m * warps_m == rows, "a scale tile must sit in one program"

        def powers(n, unit, dim):
            return [[unit << i, 0] if dim == 0 else [0, unit << i] for i in range(n.bit_length() - 1)]

        reg_k, reg_m = powers(spt_k, 1, 1), powers(spt_m, 1, 0)
        lanes = powers(tpw_k, spt_k, 1) + powers(tpw_m, spt_m, 0)
        warps = powers(warps_m, spt_m * tpw_m, 0) + powers(warps_k, spt_k * tpw_k, 1)
        regs = reg_m + reg_k if tokens_first else reg_k + reg_m
        return gl.DistributedLinearLayout(regs, lanes, warps, [], [rows, spt_k * tpw_k * warps_k])

    @gluon.jit
    def _quant_act_gluon_kernel(
        x_ptr, rows_ptr, mult_ptr, yt_ptr, st_ptr, M, K, POW2: gl.constexpr, SPT_M: gl.constexpr,
        SPT_K: gl.constexpr, TPW_M: gl.constexpr, WARPS_M: gl.constexpr, WARPS_K: gl.constexpr,
        GATHER: gl.constexpr = False, MULT: gl.constexpr = False, SKIP_PADDING: gl.constexpr = False,
    ):  # fmt: skip
        # One program: X[128 tokens, BLOCK_K channels] -> yT_KM and sT_KMb (see _quant_act_kernel, COL).
        # SKIP_PADDING: a tile of padding rows only stores nothing (see quantize_act_t).
        LD: gl.constexpr = _transpose_layout(SPT_M, SPT_K, TPW_M, WARPS_M, WARPS_K, False)
        ST: gl.constexpr = _transpose_layout(SPT_M, SPT_K, TPW_M, WARPS_M, WARPS_K, True)
        BLOCK_K: gl.constexpr = SPT_K * (32 // TPW_M) * WARPS_K
        pid_m = gl.program_id(0)
        pid_k = gl.program_id(1)
        offs_m = pid_m * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, LD))
        offs_k = pid_k * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LD))
        mask_m = offs_m < M
        load_mask = mask_m[:, None] & (offs_k[None, :] < K)
        src_m = offs_m
        if GATHER:  # as _load_rows: -1 is a padding row of zeros
            src_m = gl.load(rows_ptr + offs_m, mask=mask_m, other=-1)
            load_mask = load_mask & (src_m >= 0)[:, None]
        store_tile = True
        if SKIP_PADDING:  # the whole tile skipped, loads and arithmetic too, not only its stores
            store_tile = gl.max(src_m, axis=0) >= 0
        if store_tile:
            x = gl.load(x_ptr + src_m[:, None].to(gl.int64) * K + offs_k[None, :], mask=load_mask, other=0.0)
            x = x.to(gl.float32)
            if MULT:  # as _load_rows
                mult = gl.load(mult_ptr + offs_m, mask=mask_m, other=0.0).to(gl.float32)
                x = _round_mult(x * mult[:, None], x_ptr.dtype.element_ty, False)
            st = _scale_from_amax(gl.max(gl.abs(x), axis=0), POW2, True)  # [BLOCK_K]
            # The layout changes while the quotient is fp32 (a renaming of registers), then the cast packs each
            # thread's consecutive tokens; converting the e4m3 bytes instead cost ~250 byte moves a thread (PRMT,
            # LOP3, SHF in the sm_90a SASS). With _div's and _scale_from_amax's FAST_DIV changes, 15-16% off the
            # routed experts' gathered calls on an H200 (benchmarks/RESULTS.md, session 18).
            yt = gl.convert_layout(_div(x, st[None, :], gl.div_rn(1.0, st)[None, :], True), ST).to(gl.float8e4nv)
            offs_m_st = pid_m * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, ST))
            offs_k_st = pid_k * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, ST))
            mask = (offs_m_st[:, None] < M) & (offs_k_st[None, :] < K)
            gl.store(yt_ptr + offs_k_st[None, :].to(gl.int64) * M + offs_m_st[:, None], yt, mask=mask)
            gl.store(st_ptr + pid_m * K + offs_k, st, mask=offs_k < K)  # step-major: see quantize_act_t

    @gluon.jit
    def _quant_weight_t_gluon_kernel(
        w_ptr, y_ptr, s_ptr, yt_ptr, N, K, POW2: gl.constexpr, SPT_N: gl.constexpr, SPT_K: gl.constexpr,
        TPW_N: gl.constexpr, WARPS_N: gl.constexpr, WARPS_K: gl.constexpr,
    ):  # fmt: skip
        # _quant_weight_kernel with TRANS: one 128x128 block, stored N-major (from LD) and K-major (from
        # ST). The quotient is cast to e4m3 separately for each store, after the (free) layout change:
        # converting the cast e4m3 tensor instead, while it also feeds the N-major store, gave wrong
        # K-major codes on an H200 (Triton 3.6, 16-divisible shapes only; 2026-11-30).
        LD: gl.constexpr = _transpose_layout(SPT_N, SPT_K, TPW_N, WARPS_N, WARPS_K, False)
        ST: gl.constexpr = _transpose_layout(SPT_N, SPT_K, TPW_N, WARPS_N, WARPS_K, True)
        gl.static_assert(SPT_K * (32 // TPW_N) * WARPS_K == 128, "one 128x128 block a program")
        nb = gl.program_id(0)
        kb = gl.program_id(1)
        e = gl.program_id(2).to(gl.int64)
        w_ptr += e * N * K
        y_ptr += e * N * K
        yt_ptr += e * N * K
        s_ptr += e * gl.cdiv(N, 128) * gl.cdiv(K, 128)
        offs_n = nb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, LD))
        offs_k = kb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, LD))
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = gl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(gl.float32)
        s = _scale_from_amax(gl.max(gl.max(gl.abs(w), axis=0), axis=0), POW2, True)  # tokens first: in-thread
        q = _div(w, s, gl.div_rn(1.0, s), True)
        gl.store(y_ptr + offs_n[:, None] * K + offs_k[None, :], q.to(gl.float8e4nv), mask=mask)
        yt = gl.convert_layout(q, ST).to(gl.float8e4nv)
        offs_n = nb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, ST))
        offs_k = kb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, ST))
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        gl.store(yt_ptr + offs_k[None, :] * N + offs_n[:, None], yt, mask=mask)
        gl.store(s_ptr + nb * gl.cdiv(K, 128) + kb, s)

# ---------------------------------------------------------------------------------------------
# Launchers


def _check_2d(x: torch.Tensor, name: str) -> None:
    assert x.dim() == 2, f"{name} must be 2-D, got {tuple(x.shape)}"
    assert x.is_contiguous(), f"{name} must be contiguous"


# Tile of each @triton.jit launch: (BLOCK_M, BLOCK_K, num_warps) on a GPU; the interpreter takes the
# smallest. Measured on an H200 (2026-11-30, 16384x7168 bf16): row (64, 128, 8) 86-87% of copy
# bandwidth, col (128, 64, 4) 71-72%. Row re-measured at the V3 MoE layer's calls (2026-12-01, session 17,
# benchmarks/RESULTS.md): (32, 128, 4) 6% faster on the routed experts' gathered rows (282 against 302 us),
# level elsewhere (451.6 against 452.6 us at 65536x7168).
QUANT_TILES = {"row": (32, 128, 4), "col": (128, 64, 4)}
# The 128x1 tiling alone and the weight's K-major copy take the Gluon kernels on a GPU where Triton has
# Gluon (the in-register transpose above); the interpreter and older Triton take the @triton.jit ones
# (selected in _use_gluon). Tiles: (SPT_M, SPT_K, TPW_M, WARPS_M, WARPS_K), see _transpose_layout.
# Measured on an H200 (2026-11-30, 16384x7168 bf16, one run, copy 4092 GB/s): quantize_act_t 83% at
# (16, 8, 8, 1, 4) (the @triton.jit kernel 72% in the same run); quantize_weight(transposed=True) 84.5%
# at (8, 8, 8, 2, 4) (the @triton.jit kernel 57%). Re-measured with the layouts built at compile time
# (benchmarks/bench_quant.py, same day): 83% / 84% at 16384x7168; at 4096x7168 (a 35 us launch, copy
# itself 3626 GB/s there) 70% / 80%, against the @triton.jit kernels' 68% / 57%.
QUANT_T_GLUON = (16, 8, 8, 1, 4)
QUANT_WEIGHT_T_GLUON = (8, 8, 8, 2, 4)
# On a GPU, divide by Markstein's correction of x * (1/s) instead of div.rn (same bits; see _div):
# on an H200 it lifted the 1x128 kernel from 81% to 86% of copy bandwidth and the weight one from 66% to 86%.
FAST_DIV = True


def _use_gluon(impl: str | None, fast_div: bool | None, triton_args: bool = False) -> bool:
    """The one selection point between the Gluon and the @triton.jit kernel of a transposed store.
    triton_args: the caller passed a @triton.jit tile (3-tuple) or num_warps, so it means that kernel."""
    if tt.interpreting() or not HAS_GLUON or not (FAST_DIV if fast_div is None else fast_div):
        return False  # the Gluon kernels divide by the corrected reciprocal only (see _div)
    assert impl in (None, "triton", "gluon"), impl
    return not triton_args if impl is None else impl == "gluon"


def _gathered_rows(x_MK: torch.Tensor, rows: torch.Tensor | None, row_scale: torch.Tensor | None) -> int:
    """Check the gather/scale arguments of the activation quantisers; return M, the number of rows of X."""
    _check_2d(x_MK, "x_MK")
    M = x_MK.shape[0]
    if rows is not None:
        assert rows.dim() == 1 and rows.is_contiguous(), "rows must be a contiguous 1-D index"
        assert rows.dtype in (torch.int32, torch.int64) and rows.device == x_MK.device, (
            "rows: int32/int64 on x's device"
        )
        M = rows.shape[0]
    if row_scale is not None:
        assert row_scale.shape == (M,) and row_scale.is_contiguous(), f"row_scale must be contiguous [{M}]"
        assert row_scale.device == x_MK.device, "row_scale must be on x's device"
    return M


def _quant_launch(
    x_MK: torch.Tensor,
    row: bool,
    col: bool,
    pow2: bool,
    tile=None,
    fast_div: bool | None = None,
    impl: str | None = None,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    skip_padding_tiles: bool = False,
):
    """Quantise X = x_MK, or X = x_MK[rows] * row_scale[:, None] rounded to x's dtype (either optional) read
    straight from x_MK: the routed experts' input (x's tokens repeated in expert order) and their output gradient
    (the combined gradient's rows times the routing weights) are never written out in bf16.
    skip_padding_tiles: see quantize_act_t (the Gluon kernel skips such tiles; the @triton.jit one writes them)."""
    tt.require_fp8("quantize_act" if row else "quantize_act_t")
    assert row != col, "one tiling a launch (quantize_act_both launches twice)"
    assert not skip_padding_tiles or (col and rows is not None), "skip_padding_tiles: the 128x1 tiling of x[rows]"
    M = _gathered_rows(x_MK, rows, row_scale)
    K = x_MK.shape[1]
    dev = x_MK.device
    y = s = yt = st = None
    if row:
        y = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=dev)
        s = torch.empty(M, triton.cdiv(K, BLOCK), dtype=torch.float32, device=dev)
    if col:
        yt = torch.empty(K, M, dtype=torch.float8_e4m3fn, device=dev)
        st = torch.empty(triton.cdiv(M, BLOCK), K, dtype=torch.float32, device=dev).t()  # see quantize_act_t
    gather = dict(GATHER=rows is not None, MULT=row_scale is not None)
    if col and _use_gluon(impl, fast_div, tile is not None and len(tile) == 3):
        spt_m, spt_k, tpw_m, warps_m, warps_k = tile or QUANT_T_GLUON
        if M and K:
            grid = (triton.cdiv(M, 128), triton.cdiv(K, spt_k * (32 // tpw_m) * warps_k))
            _quant_act_gluon_kernel[grid](x_MK, rows, row_scale, yt, st, M, K, POW2=pow2, SPT_M=spt_m, SPT_K=spt_k,
                                          TPW_M=tpw_m, WARPS_M=warps_m, WARPS_K=warps_k,
                                          SKIP_PADDING=skip_padding_tiles, num_warps=warps_m * warps_k,
                                          **gather)  # fmt: skip
        return y, s, yt, st
    if tt.interpreting():
        block_m, block_k, warps = (128 if col else 16), (128 if row else 16), 4
    else:
        block_m, block_k, warps = tile or QUANT_TILES["row" if row else "col"]
    assert (not row or block_k == BLOCK) and (not col or block_m == BLOCK), "a scale tile must sit in one program"
    if M and K:
        grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
        fast = (FAST_DIV if fast_div is None else fast_div) and not tt.interpreting()
        _quant_act_kernel[grid](x_MK, rows, row_scale, y, s, yt, st, M, K, ROW=row, COL=col, POW2=pow2,
                                EXACT=tt.interpreting(), BLOCK_M=block_m, BLOCK_K=block_k, FAST_DIV=fast,
                                num_warps=warps, **gather)  # fmt: skip
    return y, s, yt, st


def quantize_act(
    x_MK: torch.Tensor,
    pow2: bool = False,
    fast_div: bool | None = None,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1x128 quantisation: returns (x_fp8 [M, K] e4m3, scale [M, Kb] fp32).

    fast_div (here and below): the division on a GPU, None = FAST_DIV (benchmarks check both give the same bits).
    rows / row_scale (here and below): quantise `(x_MK[rows] * row_scale[:, None]).to(x_MK.dtype)` instead, without
    materialising it (M = len(rows)); a row index of -1 gives a row of zeros (the padding that lines experts up
    with the 128-token tiles, fp8_linear.pad_experts_to_tiles). Indices are not range-checked (that would read them
    back to the host)."""
    y, s, _, _ = _quant_launch(x_MK, True, False, pow2, fast_div=fast_div, rows=rows, row_scale=row_scale)
    return y, s


def quantize_act_t(
    x_MK: torch.Tensor,
    pow2: bool = False,
    fast_div: bool | None = None,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    skip_padding_tiles: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transposed 128x1 quantisation along tokens: returns (xT_fp8 [K, M] e4m3, scale [K, Mb] fp32).

    Equal to `quantize_act(x_MK.T.contiguous())`, without materialising the transpose. The scale is a transposed
    view: its storage is step-major, [Mb, K] contiguous, one 128-token step's scales side by side, as the
    weight-gradient GEMMs read them (by TMA on Hopper); the kernels store it so, coalesced, and no transpose is
    copied between them (fp8_gemm_wgrad and fp8_grouped_gemm_wgrad take either layout).
    skip_padding_tiles (with rows): the codes and scales of a 128-row tile whose rows are all padding (-1) may be
    left unwritten (undefined). pad_experts_to_tiles's layout ends in such tiles (its static length bounds the
    padding; at V3's routing about a sixth of its rows), and the weight-gradient GEMM never reads them.
    """
    _, _, yt, st = _quant_launch(x_MK, False, True, pow2, fast_div=fast_div, rows=rows, row_scale=row_scale,
                                 skip_padding_tiles=skip_padding_tiles)  # fmt: skip
    return yt, st


def quantize_act_both(
    x_MK: torch.Tensor,
    pow2: bool = False,
    fast_div: bool | None = None,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_act(x) + quantize_act_t(x)`: (x_fp8, scale, xT_fp8, scaleT), in two launches.

    One kernel reading x once for both tilings was slower on an H200 at every shape timed: a @triton.jit one
    (128x128 tiles) and a Gluon one (the transpose in registers, five tiles) took 295-382 us at 16384x7168 bf16
    against 200 us for these two launches, and 50-61 us against 49 us at 16384x1024 (benchmarks/RESULTS.md,
    session 6). Our reading: a program holding both tilings' quotients needs too many registers a thread to keep
    enough warps resident to hide the memory latency.
    """
    return (
        *quantize_act(x_MK, pow2, fast_div, rows, row_scale),
        *quantize_act_t(x_MK, pow2, fast_div, rows, row_scale),
    )


def _check_weight(w: torch.Tensor, name: str) -> None:
    assert w.dim() in (2, 3), f"{name} must be [N, K] or stacked experts [E, N, K], got {tuple(w.shape)}"
    assert w.is_contiguous(), f"{name} must be contiguous"


def quantize_weight(w_NK: torch.Tensor, pow2: bool = False, transposed: bool = False, num_warps: int | None = None,
                    fast_div: bool | None = None, impl: str | None = None, tile=None):  # fmt: skip
    """128x128 block quantisation: returns (w_fp8 [N, K] e4m3, weight_scale_inv [Nb, Kb] fp32).

    Stacked expert weights [E, N, K] give [E, Nb, Kb] scales (blocks never straddle experts).
    transposed=True also returns the K-major copy w_fp8T [K, N] ([E, K, N]) written in the same
    pass (what the dgrad GEMM reads): (w_fp8, weight_scale_inv, w_fp8T). impl ("triton" / "gluon")
    and tile (QUANT_WEIGHT_T_GLUON's form) override the kernel choice of the transposed case (benchmarks).
    """
    tt.require_fp8("quantize_weight")
    _check_weight(w_NK, "w_NK")
    *lead, N, K = w_NK.shape
    y_NK = torch.empty(w_NK.shape, dtype=torch.float8_e4m3fn, device=w_NK.device)
    y_KN = torch.empty(*lead, K, N, dtype=torch.float8_e4m3fn, device=w_NK.device) if transposed else None
    s_NbKb = torch.empty(*lead, triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK), dtype=torch.float32, device=w_NK.device)
    grid = (triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK), lead[0] if lead else 1)  # one 128x128 block a program
    if y_NK.numel() and transposed and _use_gluon(impl, fast_div, num_warps is not None):
        spt_n, spt_k, tpw_n, warps_n, warps_k = tile or QUANT_WEIGHT_T_GLUON
        _quant_weight_t_gluon_kernel[grid](w_NK, y_NK, s_NbKb, y_KN, N, K, POW2=pow2, SPT_N=spt_n, SPT_K=spt_k,
                                           TPW_N=tpw_n, WARPS_N=warps_n, WARPS_K=warps_k,
                                           num_warps=warps_n * warps_k)  # fmt: skip
    elif y_NK.numel():
        fast = (FAST_DIV if fast_div is None else fast_div) and not tt.interpreting()
        _quant_weight_kernel[grid](w_NK, y_NK, s_NbKb, y_KN, N, K, POW2=pow2, EXACT=tt.interpreting(), TRANS=transposed,
                                   FAST_DIV=fast, num_warps=num_warps or (16 if transposed else 8))  # fmt: skip
    return (y_NK, s_NbKb, y_KN) if transposed else (y_NK, s_NbKb)


def dequantize_weight(
    w_fp8_NK: torch.Tensor, scale_inv_NbKb: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """w = w_fp8 * weight_scale_inv, broadcast over each 128x128 block (ragged edges included)."""
    tt.require_fp8("dequantize_weight")
    _check_weight(w_fp8_NK, "w_fp8_NK")
    *lead, N, K = w_fp8_NK.shape
    want = (*lead, triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK))
    assert tuple(scale_inv_NbKb.shape) == want, f"scale_inv must be {want}, got {tuple(scale_inv_NbKb.shape)}"
    w_NK = torch.empty(w_fp8_NK.shape, dtype=dtype, device=w_fp8_NK.device)
    if w_NK.numel():
        grid = (want[-2], want[-1], lead[0] if lead else 1)
        _dequant_weight_kernel[grid](w_fp8_NK, scale_inv_NbKb.float().contiguous(), w_NK, N, K, num_warps=8)
    return w_NK


# ---------------------------------------------------------------------------------------------
# Torch references (the ground truth of the tests; also a slow fallback anywhere)


def _pad_to(x: torch.Tensor, dim: int, mult: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % mult
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _scale_from_amax_ref(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = amax.float().clamp(min=AMAX_EPS) / FP8_MAX
    if pow2:
        mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
        s = torch.ldexp(torch.ones_like(s), torch.where(mant == 0.5, exp - 1, exp))
    return s


def quantize_act_ref(x_MK: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x_MK.shape
    x = _pad_to(x_MK.float(), 1, BLOCK).view(M, -1, BLOCK)  # [M, Kb, 128]
    s_MKb = _scale_from_amax_ref(x.abs().amax(dim=2), pow2)
    y = (x / s_MKb[..., None]).to(torch.float8_e4m3fn).view(M, -1)[:, :K]
    return y.contiguous(), s_MKb


def quantize_act_t_ref(x_MK: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_act_ref(x_MK.t().contiguous(), pow2)


def quantize_weight_ref(w_NK: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if w_NK.dim() == 3:
        ys, ss = zip(*(quantize_weight_ref(w, pow2) for w in w_NK), strict=True)
        return torch.stack(ys), torch.stack(ss)
    N, K = w_NK.shape
    w = _pad_to(_pad_to(w_NK.float(), 0, BLOCK), 1, BLOCK)
    Nb, Kb = w.shape[0] // BLOCK, w.shape[1] // BLOCK
    w = w.view(Nb, BLOCK, Kb, BLOCK)  # [Nb, 128, Kb, 128]
    s_NbKb = _scale_from_amax_ref(w.abs().amax(dim=(1, 3)), pow2)
    y = (w / s_NbKb[:, None, :, None]).to(torch.float8_e4m3fn).view(Nb * BLOCK, Kb * BLOCK)[:N, :K]
    return y.contiguous(), s_NbKb


def expand_block_scale(scale_XbYb: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[Xb, Yb] per-128x128-block scales -> [rows, cols] per-element scales."""
    return scale_XbYb.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def dequantize_weight_ref(
    w_fp8_NK: torch.Tensor, scale_inv_NbKb: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    if w_fp8_NK.dim() == 3:
        return torch.stack([dequantize_weight_ref(w, s, dtype) for w, s in zip(w_fp8_NK, scale_inv_NbKb, strict=True)])
    N, K = w_fp8_NK.shape
    return (w_fp8_NK.float() * expand_block_scale(scale_inv_NbKb.float(), N, K)).to(dtype)


def dequantize_act_ref(x_fp8_MK: torch.Tensor, scale_MKb: torch.Tensor) -> torch.Tensor:
    """fp32 x = x_fp8 * scale, each scale covering 128 consecutive elements of a row."""
    K = x_fp8_MK.shape[1]
    return x_fp8_MK.float() * scale_MKb.float().repeat_interleave(BLOCK, 1)[:, :K]
