"""The routed experts' top-k sum as one Triton kernel, for eager mode.

    out[t] = sum over slots k of (weight_TK[t, k] *) y_SD[row_TK[t, k]]

with each weighted product rounded to y's dtype, the sum in fp32 in slot order, and one rounding to y's dtype at
the end: what _sum_slots computes under torch.compile (per-slot gathers that inductor fuses), bit for
bit. Before it, eager mode took one `index_add_` into fp32, which needs the [S, D] rows written out in fp32 first
and sums them by atomics in no fixed order (about 9 ms of a V3-size MoE layer's forward+backward on an H200,
benchmarks/RESULTS.md); this kernel reads each routed row once, in bf16, and writes each token's sum once.

Its adjoint for the routing weights, slot_dots: dweight[t, k] = dout[t] . y_SD[row_TK[t, k]], one program a token,
products and sum in fp32, one rounding to y's dtype. Autograd's (and the written-out backward's) per-slot
`(dout * y[row]).sum(-1)` writes each slot's [T, D] gather out, then multiplies and reduces it: three kernels a slot,
about 2.8 ms of kernel time in the profile of a V3-size FP8 MoE layer's forward+backward on an H200
(benchmarks/RESULTS.md, session 10); this reads each routed row once.

Shape legend: T tokens, Kt slots (experts) a token, S = T * Kt routed rows, D features.
"""

from __future__ import annotations

import torch

from . import _triton as tt

triton, tl = tt.triton, tt.tl

# On: timed on an H200 in the eager V3-size MoE layer's forward+backward, 56.97 ms against 65.72 with the index_add
# it replaces (benchmarks/RESULTS.md, session 9; bench_moe_layer.py times both). modeling_dsv3._sum_slots reads it
# at call time, for the bf16 and the FP8 experts alike; False restores the index_add.
SUM_SLOTS_KERNEL = True
# The same for slot_dots (modeling_dsv3._slot_dots reads it at call time; False: the per-slot torch code).
SLOT_DOTS_KERNEL = True

if tt.HAS_TRITON:
    from .quant import _round_to

    @triton.jit
    def _sum_slots_kernel(
        y_ptr, row_ptr, w_ptr, out_ptr, D,
        KT: tl.constexpr, BLOCK_D: tl.constexpr, WEIGHTED: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_D features of one token's sum over its KT slots.
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        DTYPE: tl.constexpr = y_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(KT):
            row = tl.load(row_ptr + t * KT + k).to(tl.int64)
            term = tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:  # the weight in y's dtype, the product rounded to it: torch's `y[row] * w.to(y.dtype)`
                w = _round_to(tl.load(w_ptr + t * KT + k).to(tl.float32), DTYPE)
                term = _round_to(term * w, DTYPE)
            if k == 0:
                acc = term  # not 0 + term, which would turn a -0.0 into +0.0
            else:
                acc = acc + term
        tl.store(out_ptr + t * D + offs, _round_to(acc, DTYPE).to(DTYPE), mask=mask)

    @triton.jit
    def _slot_dots_kernel(
        g_ptr, y_ptr, row_ptr, out_ptr, D,
        KT: tl.constexpr, KT_P2: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program: one token's KT dot products g[t] . y[row[t, k]], BLOCK_D features at a time, in fp32.
        t = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, KT_P2)
        kmask = ks < KT
        rows = tl.load(row_ptr + t * KT + ks, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros([KT_P2, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            g = tl.load(g_ptr + t * D + offs, mask=dmask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * D + offs[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc += y.to(tl.float32) * g[None, :]
        DTYPE: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + t * KT + ks, _round_to(tl.sum(acc, axis=1), DTYPE).to(DTYPE), mask=kmask)


def sum_slots(y_SD: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, D] in y's dtype (see the module docstring). row_TK: int32/int64 [T, Kt], rows of y_SD; weight_TK:
    [T, Kt] or None (unweighted: the gradient of a gather)."""
    tt.require_fp8("sum_slots")  # Triton and a GPU the FP8 experts run on, or the interpreter
    assert y_SD.dim() == 2 and row_TK.dim() == 2, "y_SD [S, D] and row_TK [T, Kt]"
    assert weight_TK is None or weight_TK.shape == row_TK.shape, "weight_TK must match row_TK"
    y_SD, row_TK = y_SD.contiguous(), row_TK.contiguous()
    (T, KT), D = row_TK.shape, y_SD.shape[1]
    out = torch.empty(T, D, dtype=y_SD.dtype, device=y_SD.device)
    if T == 0 or D == 0:
        return out
    if KT == 0:
        return out.zero_()
    block_d = min(1024, triton.next_power_of_2(D))
    weighted = weight_TK is not None
    _sum_slots_kernel[(T, triton.cdiv(D, block_d))](
        y_SD, row_TK, weight_TK.contiguous() if weighted else row_TK, out, D,
        KT=KT, BLOCK_D=block_d, WEIGHTED=weighted, num_warps=4,
    )  # fmt: skip
    return out


def slot_dots(dout_TD: torch.Tensor, y_SD: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """dweight [T, Kt] in y's dtype: dweight[t, k] = dout_TD[t] . y_SD[row_TK[t, k]], products and sum in fp32 (see
    the module docstring); the routing weights' gradient of sum_slots' weighted sum."""
    tt.require_fp8("slot_dots")
    assert dout_TD.dim() == 2 and y_SD.dim() == 2 and row_TK.dim() == 2, "dout_TD [T, D], y_SD [S, D], row_TK [T, Kt]"
    assert dout_TD.shape == (row_TK.shape[0], y_SD.shape[1]), "dout_TD must be [T, D]"
    dout_TD, y_SD, row_TK = dout_TD.contiguous(), y_SD.contiguous(), row_TK.contiguous()
    (T, KT), D = row_TK.shape, y_SD.shape[1]
    out = torch.empty(T, KT, dtype=y_SD.dtype, device=y_SD.device)
    if T == 0 or KT == 0:
        return out
    if D == 0:
        return out.zero_()
    # [Kt, BLOCK_D] fp32 products a step: 8 x 512 is 32 values a thread at 4 warps.
    kt_p2 = triton.next_power_of_2(KT)
    block_d = max(16, min(512, 4096 // kt_p2, triton.next_power_of_2(D)))
    _slot_dots_kernel[(T,)](dout_TD, y_SD, row_TK, out, D, KT=KT, KT_P2=kt_p2, BLOCK_D=block_d, num_warps=4)
    return out
