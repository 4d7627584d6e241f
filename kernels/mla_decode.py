"""Absorbed-MLA decode attention over the latent cache (flash-decoding), with a torch reference beside it.

MLA caches one latent c_kv [R] (kv_lora_rank, 512 at 671B) and one roped key k_pe [r] (64) per token, shared by
every head. With W_UK folded into the query (q_lat = q_nope W_UK, done by the caller) and W_UV applied to the
output (o = o_lat W_UV^T, also the caller's), decode attention is multi-query attention whose key is [c_kv; k_pe]
(R + r wide) and whose value is c_kv itself:

    s[h, t] = scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]),   o_lat[h] = softmax_t(s[h]) . c_kv

Decode is memory-bound: every query token reads the whole cache once. So one program takes BLOCK_H heads of one
row (all of them at the small size) and streams the row's cache tiles once for those heads; with more heads than
BLOCK_H, the head blocks of a split are adjacent programs (grid axis 0) and the second read of a tile comes from
L2. The sequence is cut into splits (split-K, "flash-decoding"): each program keeps an online-softmax running max
m, sum l and accumulator acc [BLOCK_H, R] in fp32 over its split, and a second kernel combines the splits:
o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. With one split the first kernel normalises and writes o itself.

At the 671B head shape (128 heads, R = 512) the kernel is bound by the tensor cores and by latency, not by bytes:
128 x (576 + 512) x 2 FLOP per cached token is ~242 FLOP per cache byte (bf16), above the H200's ~190 FLOP/byte
ridge. Two code paths matter there (H200 sweep, batch 64, 8K context, benchmarks/bench_decode.py): SPLIT_SCORES
(the score tile computed once, split across the two warpgroups, instead of by both: 500 -> 462 us) and PREFETCH
(an L2 prefetch of the tile two steps ahead, since Triton issues a 2-stage loop's next load only after the
current tile's last dot: 462 -> 417 us). TMA (descriptor loads, the copy engine) is an option that measured no
faster. What keeps it far from the tensor-core rate is Triton's schedule: one program per SM (the [64, 512] fp32
accumulator fills half the register file), and within it load, score dot, softmax and p.c_kv dot run one after
the other, with no warpgroup specialisation to overlap them (FlashMLA's design).

Masks: `lengths` [B] (positions >= lengths[b] are skipped: a static cache's unwritten tail) and/or a boolean `mask`
[B, T] (False = padding hole). A mask alone also bounds the loop: its last True + 1 is computed on the device, so
nothing syncs and a CUDA graph can capture the call. A row with no valid position returns zeros.

Shape legend: B rows, H heads, T cache positions, R latent width (kv_lora_rank), r rope width (qk_rope_head_dim),
NS splits.
"""

from __future__ import annotations

import functools

import torch

from . import _triton as tt

triton, tl = tt.triton, tt.tl

LOG2E = 1.4426950408889634


def require_triton(feature: str, device: torch.device) -> None:
    """Raise a RuntimeError saying why the MLA kernel cannot run here; return if it can (any CUDA GPU, or the
    interpreter on the CPU). Unlike the FP8 kernels it needs no particular compute capability."""
    caps = tt.capabilities()
    if not caps.triton:
        raise RuntimeError(
            f"{feature}: the MLA decode kernel needs Triton, which is not importable ({tt._TRITON_ERROR})"
        )
    if tt.interpreting():
        tt._interpret_triton_stdlib()
        return
    if device.type != "cuda":
        raise RuntimeError(
            f"{feature}: the MLA decode kernel runs on CUDA tensors, got {device.type} "
            "(set TRITON_INTERPRET=1 to run it on the CPU, slowly)"
        )


def dot_modes(dtype: torch.dtype) -> dict:
    """The IEEE / UPCAST constexprs of _mla_dot and _mla_dot_t for operands of `dtype`: fp32 operands take
    full-precision dots (a GPU's default would be tf32); under the interpreter, whose bf16 dot multiplies raw bits,
    16-bit operands go through an fp32 dot of the same values."""
    return dict(IEEE=dtype == torch.float32, UPCAST=tt.interpreting() and dtype != torch.float32)


if tt.HAS_TRITON:

    @triton.jit
    def _mla_dot_t(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """acc + a . b^T (a [M, K], b [N, K]) in fp32."""
        if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bits: compute in fp32 from the same values
            return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        elif IEEE:  # fp32 inputs: full-precision dots (the default on a GPU would be tf32)
            return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(b), acc)

    @triton.jit
    def _mla_dot(p, c, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """p . c (p already rounded to c's dtype) in fp32."""
        if UPCAST:  # same rounding of p to the cache dtype, then an fp32 dot
            return tl.dot(p.to(tl.float32), c.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(p, c, input_precision="ieee")
        else:
            return tl.dot(p, c)

    @triton.jit
    def _mla_decode_split_kernel(
        q_ptr, qpe_ptr, ckv_ptr, kpe_ptr, mask_ptr, len_ptr,
        o_ptr, m_ptr, l_ptr,
        stride_qb, stride_qh, stride_pb, stride_ph,
        stride_cb, stride_ct, stride_kb, stride_kt,
        stride_mask_b,
        stride_ob, stride_os, stride_oh,
        stride_mb, stride_ms,
        H, T, R, RP, split_len, qk_scale,
        HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr, SINGLE_SPLIT: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr, SPLIT_SCORES: tl.constexpr, TMA: tl.constexpr, PREFETCH: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RP: tl.constexpr,
    ):  # fmt: skip
        pid_h, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)  # row offsets of a long cache overflow int32 (64 x 8K x 576 x 2 B > 2^31)
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_RP)
        h_ok, r_ok, p_ok = offs_h < H, offs_r < R, offs_p < RP
        # Queries [BLOCK_H, R] and [BLOCK_H, r] stay on chip for the whole split (shared memory: the A operand of
        # the score dots on Hopper).
        q = tl.load(q_ptr + b64 * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
                    mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
        qp = tl.load(qpe_ptr + b64 * stride_pb + offs_h[:, None] * stride_ph + offs_p[None, :],
                     mask=h_ok[:, None] & p_ok[None, :], other=0.0)  # fmt: skip

        start = pid_s * split_len
        end = tl.minimum(start + split_len, T)
        if HAS_LEN:
            end = tl.minimum(end, tl.load(len_ptr + b))

        if TMA:  # descriptors over this row's valid positions: the copy engine zero-fills t >= end, as the masks do
            c_desc = tl.make_tensor_descriptor(ckv_ptr + b64 * stride_cb, shape=[end, R], strides=[stride_ct, 1],
                                               block_shape=[BLOCK_T, BLOCK_R])  # fmt: skip
            k_desc = tl.make_tensor_descriptor(kpe_ptr + b64 * stride_kb, shape=[end, RP], strides=[stride_kt, 1],
                                               block_shape=[BLOCK_T, BLOCK_RP])  # fmt: skip

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of log2-scaled scores
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < end
            if PREFETCH > 0:  # pull the tile PREFETCH steps ahead into L2 (128-byte lines) while this one computes
                pf_t = t0 + PREFETCH * BLOCK_T + tl.arange(0, BLOCK_T)
                pf_ok = pf_t < end
                pf_c = ckv_ptr + b64 * stride_cb + pf_t[:, None] * stride_ct + tl.arange(0, BLOCK_R // 64)[None, :] * 64
                pf_c = tl.where(pf_ok[:, None], pf_c, ckv_ptr)  # past the end: the row's first line, harmless
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [pf_c], dtype=tl.int32, is_pure=False,
                                          pack=1)  # fmt: skip
                pf_k = tl.where(pf_ok, kpe_ptr + b64 * stride_kb + pf_t * stride_kt, kpe_ptr)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [pf_k], dtype=tl.int32, is_pure=False,
                                          pack=1)  # fmt: skip
            if TMA:
                c = c_desc.load([t0, 0])  # [BLOCK_T, R]
                kp = k_desc.load([t0, 0])  # [BLOCK_T, r]
            else:
                c = tl.load(ckv_ptr + b64 * stride_cb + offs_t[:, None] * stride_ct + offs_r[None, :],
                            mask=t_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip  # [BLOCK_T, R]
                kp = tl.load(kpe_ptr + b64 * stride_kb + offs_t[:, None] * stride_kt + offs_p[None, :],
                             mask=t_ok[:, None] & p_ok[None, :], other=0.0)  # fmt: skip  # [BLOCK_T, r]
            valid = t_ok
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b64 * stride_mask_b + offs_t, mask=t_ok, other=0) != 0)
            if SPLIT_SCORES:
                # Triton lays out a dot whose result feeds another dot ("chained", as s feeds p.c_kv) with every
                # warp along the rows: at BLOCK_H = 64 and 8 warps both warpgroups then compute the whole score
                # tile, twice the q.c_kv tensor work and shared-memory reads. A dot inside an `if` ends the forward
                # slice that heuristic follows (at the scf.yield), so the score dots split their columns across
                # the warpgroups. Both conditions are always true here; the compiler cannot know it. The rope dot
                # runs first, in its own `if`, and is the accumulator of the q.c_kv dot.
                if t0 < end:
                    if t0 >= start:
                        sp = _mla_dot_t(qp, kp, tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32), UPCAST, IEEE)
                    else:
                        sp = tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32)
                    s = _mla_dot_t(q, c, sp, UPCAST, IEEE) * qk_scale
                    s = tl.where(valid[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.math.exp2(m_i - m_sub)
                    p = tl.math.exp2(s - m_sub[:, None])
                    l_new = l_i * alpha + tl.sum(p, 1)
                    p = p.to(c.dtype)
                else:  # never taken (t0 < end in the loop); a no-op, written without constants, which cost smem
                    m_new, l_new = m_i, l_i
                    alpha = l_i * 0.0 + 1.0
                    p = (tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32) * l_i[:, None]).to(c.dtype)
                acc = acc * alpha[:, None] + _mla_dot(p, c, UPCAST, IEEE)
                m_i, l_i = m_new, l_new
            else:
                s = _mla_dot_t(qp, kp, _mla_dot_t(q, c, tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32), UPCAST, IEEE),
                               UPCAST, IEEE)  # fmt: skip
                s = s * qk_scale  # scale * log2(e): softmax through exp2
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A head that has seen only masked positions keeps m = -inf; subtracting 0 instead keeps exp2 at 0.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_sub)
                p = tl.math.exp2(s - m_sub[:, None])  # [BLOCK_H, BLOCK_T], in [0, 1]
                l_i = l_i * alpha + tl.sum(p, 1)
                # p is cast to the cache dtype for the tensor-core dot, as the torch path casts its probabilities.
                acc = acc * alpha[:, None] + _mla_dot(p.to(c.dtype), c, UPCAST, IEEE)
                m_i = m_new

        out_mask = h_ok[:, None] & r_ok[None, :]
        if SINGLE_SPLIT:  # normalise here; no combine pass
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptr + b64 * stride_ob + offs_h[:, None] * stride_oh + offs_r[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip
        else:
            tl.store(o_ptr + b64 * stride_ob + pid_s * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :],
                     acc, mask=out_mask)  # fmt: skip
            tl.store(m_ptr + b64 * stride_mb + pid_s * stride_ms + offs_h, m_i, mask=h_ok)
            tl.store(l_ptr + b64 * stride_mb + pid_s * stride_ms + offs_h, l_i, mask=h_ok)

    @triton.jit
    def _mla_decode_combine_kernel(
        op_ptr, m_ptr, l_ptr, o_ptr,
        stride_pb, stride_ps, stride_ph, stride_mb, stride_ms, stride_ob, stride_oh,
        NS, R,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        s_ok, r_ok = offs_s < NS, offs_r < R
        m = tl.load(m_ptr + b * stride_mb + offs_s * stride_ms + h, mask=s_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + b * stride_mb + offs_s * stride_ms + h, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [BLOCK_S]; empty splits weigh 0
        denom = tl.sum(w * l_s, 0)
        acc = tl.load(op_ptr + b * stride_pb + offs_s[:, None] * stride_ps + h * stride_ph + offs_r[None, :],
                      mask=s_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip  # [BLOCK_S, R]
        out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_r, out.to(o_ptr.dtype.element_ty), mask=r_ok)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_splits(programs_per_split: int, T: int, sms: int) -> int:
    """Number of splits: as many as keep the grid within one wave of programs (one per SM), at least one, and no
    split shorter than 256 positions. Measured on an H200 (B=64, T=8K, 16 heads): 2 splits (128 programs) 76.8 us,
    4: 81.3, 8: 87.4, 16: 94.5, 32: 111.7; at 128 heads, 1 split (128 programs) beats 2, 4 and 8 (2026-11-30, with
    the default 128-head tiles: 416.8 us vs 431.6 at 2 splits). Beyond one wave
    the extra partial-result traffic and the second, partly filled wave cost more than they hide."""
    return max(1, min(sms // programs_per_split, triton.cdiv(T, 256)))


def default_config(B: int, H: int, T: int, R: int, device: torch.device) -> dict:
    """Tile sizes, split count and code path, from the H200 sweep in benchmarks/bench_decode.py. BLOCK_H covers
    every head up to 64 (tl.dot needs >= 16 rows); its fp32 accumulator [BLOCK_H, R] lives in registers, hence
    64 x 512 at most (8 warps). At R = 256, [128, 256] c_kv tiles with 4 warps and 3 stages read at 92-93% of
    copy bandwidth (77 us); TMA, L2 prefetch and other tiles measured slower there. At R = 512 (128 heads):
    [64, 512] tiles, 8 warps, 2 stages (q and two tiles fill 216 of the 227 KB of shared memory), scores split
    across warpgroups, L2 prefetch two tiles ahead: 417 us, against 420-423 us prefetching one tile ahead, 437 at
    four, 462 without prefetch, 420 for [128, 512] TMA tiles in one stage, 500 for the previous default, and
    503-533 us for [32, 512] tiles at 3-4 stages. `split_scores`, `tma` and `prefetch` pick the kernel's code
    paths (see the kernel's comments)."""
    block_h = min(64, max(16, triton.next_power_of_2(H)))
    head_blocks = triton.cdiv(H, block_h)
    if R >= 512:
        block_t, num_warps, num_stages = 64, 8, 2
        split_scores, tma, prefetch = True, False, 2
    else:
        block_t, num_warps, num_stages = 128, 4, 3
        split_scores, tma, prefetch = False, False, 0
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        num_splits = pick_splits(B * head_blocks, T, sms)
    else:
        num_splits = 1  # the interpreter runs programs one by one: fewest is fastest
    return dict(block_h=block_h, block_t=block_t, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                split_scores=split_scores, tma=tma, prefetch=prefetch)  # fmt: skip


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """The copy engine's rules for a [rows, width] descriptor per batch row: 16-byte aligned base addresses and
    16-byte multiples for the batch and row strides (the last dim is contiguous, checked by the caller)."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16:
            return False
    return True


def _scratch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton launches on the current device; the interpreter runs on the CPU."""
    device = torch.device("cpu") if tt.interpreting() else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(size, dtype=torch.int8, device=device)


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors live in a global scratch buffer (128 bytes each) that Triton asks its allocator
    for at launch: set one (a torch allocation, so CUDA graphs capture it) unless the caller set their own."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch_allocator)


def valid_lengths(mask_BT: torch.Tensor) -> torch.Tensor:
    """Last True position + 1 per row (int32), on the device: bounds the kernel's loop without a host sync."""
    T = mask_BT.shape[-1]
    positions = torch.arange(1, T + 1, device=mask_BT.device, dtype=torch.int32)
    return (mask_BT.to(torch.int32) * positions).amax(-1).to(torch.int32)


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scale: float,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_scores: bool | None = None,
    tma: bool | None = None,
    prefetch: int | None = None,
) -> torch.Tensor:
    """Absorbed-MLA decode attention: o_lat [B, H, R] (dtype of c_kv) from q_lat [B, H, R], q_pe [B, H, r],
    c_kv [B, T, R], k_pe [B, T, r], the softmax scale, and optionally lengths [B] (int) and/or mask [B, T] (bool,
    True = attend). Scores, softmax and the accumulator run in fp32. The keyword tile settings override
    `default_config` (benchmarks sweep them)."""
    require_triton("mla_decode", c_kv.device)
    B, H, R = q_lat.shape
    T, r = c_kv.shape[1], k_pe.shape[2]
    assert q_pe.shape == (B, H, r) and c_kv.shape == (B, T, R) and k_pe.shape == (B, T, r), "shape mismatch"
    assert q_lat.dtype == q_pe.dtype == c_kv.dtype == k_pe.dtype, "q_lat, q_pe, c_kv and k_pe must share a dtype"
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("c_kv", c_kv), ("k_pe", k_pe)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim"
    out = torch.empty(B, H, R, device=c_kv.device, dtype=c_kv.dtype)
    if T == 0 or B == 0:
        return out.zero_()
    cfg = default_config(B, H, T, R, c_kv.device)
    for key, value in (("num_splits", num_splits), ("block_h", block_h), ("block_t", block_t),
                       ("num_warps", num_warps), ("num_stages", num_stages), ("split_scores", split_scores),
                       ("tma", tma), ("prefetch", prefetch)):  # fmt: skip
        if value is not None:
            cfg[key] = value
    if mask is not None:
        mask = mask.expand(B, T)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        bound = valid_lengths(mask)
        lengths = bound if lengths is None else torch.minimum(lengths.to(torch.int32), bound)
    if lengths is not None:
        lengths = lengths.to(device=c_kv.device, dtype=torch.int32).contiguous()

    block_t = cfg["block_t"]
    ns = max(1, min(cfg["num_splits"], triton.cdiv(T, block_t)))
    split_len = triton.cdiv(triton.cdiv(T, ns), block_t) * block_t  # a whole number of tiles per split
    ns = triton.cdiv(T, split_len)
    block_r, block_rp = max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(r))
    grid = (triton.cdiv(H, cfg["block_h"]), ns, B)
    if ns == 1:
        o_part, m_part, l_part = out, out, out  # m/l unused: the kernel normalises and writes `out`
        so = (out.stride(0), 0, out.stride(1))
        sm = (0, 0)
    else:
        o_part = torch.empty(B, ns, H, R, device=c_kv.device, dtype=torch.float32)
        m_part = torch.empty(B, ns, H, device=c_kv.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        so = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
        sm = (m_part.stride(0), m_part.stride(1))
    use_tma = bool(cfg["tma"]) and _tma_ok(c_kv, k_pe)
    if use_tma:
        _ensure_allocator()
    prefetch_tiles = 0 if tt.interpreting() else int(cfg["prefetch"])  # inline PTX: GPU only
    dummy = c_kv  # pointer for absent optional inputs (never dereferenced: HAS_MASK / HAS_LEN are False)
    _mla_decode_split_kernel[grid](
        q_lat, q_pe, c_kv, k_pe, mask if mask is not None else dummy, lengths if lengths is not None else dummy,
        o_part, m_part, l_part,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        c_kv.stride(0), c_kv.stride(1), k_pe.stride(0), k_pe.stride(1),
        mask.stride(0) if mask is not None else 0,
        *so, *sm,
        H, T, R, r, split_len, scale * LOG2E,
        HAS_MASK=mask is not None, HAS_LEN=lengths is not None, SINGLE_SPLIT=ns == 1,
        **dot_modes(c_kv.dtype),
        SPLIT_SCORES=bool(cfg["split_scores"]), TMA=use_tma, PREFETCH=prefetch_tiles,
        BLOCK_H=cfg["block_h"], BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_RP=block_rp,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if ns > 1:
        _mla_decode_combine_kernel[(H, B)](
            o_part, m_part, l_part, out,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1),
            out.stride(0), out.stride(1),
            ns, R,
            BLOCK_S=max(2, triton.next_power_of_2(ns)), BLOCK_R=block_r,
            num_warps=4,
        )  # fmt: skip
    return out


def mla_decode_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    scale: float,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `mla_decode` (same arguments), computed in fp32 from the same inputs; a row with no
    valid position gives zeros."""
    B, H, R = q_lat.shape
    T = c_kv.shape[1]
    c32 = c_kv.float()
    scores_BHT = (torch.einsum("bhr,btr->bht", q_lat.float(), c32)
                  + torch.einsum("bhr,btr->bht", q_pe.float(), k_pe.float())) * scale  # fmt: skip
    valid_BT = torch.ones(B, T, dtype=torch.bool, device=c_kv.device)
    if mask is not None:
        valid_BT = valid_BT & mask.expand(B, T).bool()
    if lengths is not None:
        valid_BT = valid_BT & (torch.arange(T, device=c_kv.device)[None, :] < lengths.to(c_kv.device)[:, None])
    scores_BHT = scores_BHT.masked_fill(~valid_BT[:, None, :], float("-inf"))
    probs = torch.nan_to_num(scores_BHT.softmax(-1), nan=0.0)  # all-masked rows: 0, as the kernel
    return torch.einsum("bht,btr->bhr", probs, c32).to(c_kv.dtype)


def latent_cache_bytes(B: int, T: int, R: int, r: int, dtype: torch.dtype) -> int:
    """Bytes one decode step reads from the latent cache (c_kv and k_pe) for one layer."""
    return B * T * (R + r) * torch.empty((), dtype=dtype).element_size()


__all__ = ["default_config", "latent_cache_bytes", "mla_decode", "mla_decode_ref", "require_triton", "valid_lengths"]
