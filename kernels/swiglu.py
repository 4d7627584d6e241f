"""SwiGLU of the fused gate/up projection as one Triton kernel each way, for the FP8 experts in eager mode.

    a = silu(gate) * up,  gate = h[:, :I], up = h[:, I:]

Forward reads h once and writes a; backward reads h and da once and writes dh = [dgate, dup] in place of the
five kernels eager autograd runs (silu, mul; their two backwards and the `cat` of chunk's backward, three of them on
strided halves of h), and without keeping silu(gate) alive for backward (only h, which the caller keeps anyway).
Each intermediate is rounded to h's dtype where torch's eager ops round it (silu(gate), then the product; in
backward da * up, da * silu(gate), then the silu derivative's product), with torch's formulas in fp32, so the
results are torch's up to the last bit of exp (test_swiglu.py bounds it). Each rounding is the hardware cast on a
GPU and quant._round_to's integer arithmetic under the interpreter (same bits; quant._round_mult): the integer form
cost 18-20% of these kernels' SASS instructions for sm_90a (704 -> 576 forward, 1136 -> 904 backward, with the
1x128 quantisation; counted on the CPU, session 18, not yet timed). Under torch.compile the caller keeps the torch
expression, which inductor fuses itself.

With `pow2` given (the FP8 routed experts: fp8_linear's _swiglu_quantizes), each kernel also writes its output
quantised in 1x128 tiles (quant.quantize_act's codes and scales, bit for bit) from the registers that hold it: the
forward a for the down projection, the backward dh for the gate/up projection's dgrad. That quantiser's pass over a or dh
(a read of the bf16 tensor, about 117 and 257 us at V3 size on an H200) is gone; the 128x1 tiling, which
quant.quantize_act_t gathers in the wgrad's padded layout, still reads them.

Shape legend: S rows, I = half of h's width.
"""

from __future__ import annotations

import torch

from . import _triton as tt

triton, tl = tt.triton, tt.tl

BLOCK_ROWS, BLOCK_COLS = 8, 256  # a tile of a: 2048 elements, 16 a thread at 4 warps
QUANT_BLOCK_ROWS = 16  # with the 1x128 quantisation: tiles of 16 x 128, one scale block a row

if tt.HAS_TRITON:
    from .quant import BLOCK, _quantize_rows, _round_mult

    @triton.jit
    def _load_gate_up(h_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # noqa: E741
        # This program's tile: gate and up in fp32, the gate's offsets in h [S, 2I] (up's are I further), the mask,
        # the tile's offsets in an [S, I] tensor (a, da), and its rows.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < S)[:, None] & (cols < I)[None, :]
        offs = rows[:, None] * (2 * I) + cols[None, :]
        g = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + offs + I, mask=mask, other=0.0).to(tl.float32)
        return g, u, offs, mask, rows[:, None] * I + cols[None, :], rows

    @triton.jit
    def _store_quantized(v, q_ptr, s_ptr, offs, mask, s_offs, s_mask, POW2: tl.constexpr, EXACT: tl.constexpr):
        # v [rows, 128]: one 1x128 tile a row (masked lanes 0), quantised as quantize_act's kernel does.
        q, s = _quantize_rows(v, POW2, not EXACT, EXACT)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + s_offs, s, mask=s_mask)

    @triton.jit
    def _silu_rounded(g, DTYPE: tl.constexpr, EXACT: tl.constexpr):
        # torch's silu: x / (1 + exp(-x)) in fp32, rounded to the tensor's dtype (EXACT: see the module docstring).
        return _round_mult(g / (1.0 + tl.exp(-g)), DTYPE, EXACT)

    @triton.jit
    def _swiglu_fwd_kernel(
        h_ptr, a_ptr, q_ptr, s_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # noqa: E741
        QUANT: tl.constexpr = False, POW2: tl.constexpr = False, EXACT: tl.constexpr = False,
    ):  # fmt: skip
        g, u, _, mask, a_offs, rows = _load_gate_up(h_ptr, S, I, BLOCK_R, BLOCK_C)
        DTYPE: tl.constexpr = a_ptr.dtype.element_ty
        a = _round_mult(_silu_rounded(g, DTYPE, EXACT) * u, DTYPE, EXACT)
        tl.store(a_ptr + a_offs, a.to(DTYPE), mask=mask)
        if QUANT:  # BLOCK_C = 128: the tile's rows are 1x128 tiles of a [S, I], scales [S, Ib]
            s_offs = rows * tl.cdiv(I, 128) + tl.program_id(1)
            _store_quantized(a, q_ptr, s_ptr, a_offs, mask, s_offs, rows < S, POW2, EXACT)

    @triton.jit
    def _swiglu_bwd_kernel(
        h_ptr, da_ptr, dh_ptr, q_ptr, s_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # noqa: E741
        QUANT: tl.constexpr = False, POW2: tl.constexpr = False, EXACT: tl.constexpr = False,
    ):  # fmt: skip
        g, u, offs, mask, a_offs, rows = _load_gate_up(h_ptr, S, I, BLOCK_R, BLOCK_C)
        DTYPE: tl.constexpr = dh_ptr.dtype.element_ty
        da = tl.load(da_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
        d_up = _round_mult(da * _silu_rounded(g, DTYPE, EXACT), DTYPE, EXACT)  # mul's backward: da * silu(gate)
        d_silu = _round_mult(da * u, DTYPE, EXACT)  # and da * up
        # torch's silu_backward: dy * sigmoid * (1 + x * (1 - sigmoid)), in fp32
        sig = 1.0 / (1.0 + tl.exp(-g))
        d_gate = _round_mult(d_silu * sig * (1.0 + g * (1.0 - sig)), DTYPE, EXACT)
        tl.store(dh_ptr + offs, d_gate.to(DTYPE), mask=mask)
        tl.store(dh_ptr + offs + I, d_up.to(DTYPE), mask=mask)
        if QUANT:  # BLOCK_C = 128 and I % 128 == 0: the tile's gate and up halves are 1x128 tiles of dh [S, 2I]
            s_offs = rows * (2 * I // 128) + tl.program_id(1)
            _store_quantized(d_gate, q_ptr, s_ptr, offs, mask, s_offs, rows < S, POW2, EXACT)
            _store_quantized(d_up, q_ptr, s_ptr, offs + I, mask, s_offs + I // 128, rows < S, POW2, EXACT)


def quantizes(I: int) -> bool:  # noqa: E741
    """Whether swiglu_forward / swiglu_backward can quantise for this half-width: dh's 1x128 tiles must not
    straddle its gate and up halves."""
    return I % BLOCK == 0


def _launch(kernel, S: int, I: int, tensors: list, out: torch.Tensor, pow2: bool | None):  # noqa: E741
    """Run a kernel over [S, I]; with pow2 (True/False) also quantise `out` 1x128: returns (q, s), else (None, None)."""
    q = s = None
    quant = {}
    if pow2 is not None:
        q = torch.empty_like(out, dtype=torch.float8_e4m3fn)
        s = torch.empty(out.shape[0], triton.cdiv(out.shape[1], BLOCK), dtype=torch.float32, device=out.device)
        quant = dict(QUANT=True, POW2=pow2)
    if out.numel():
        block_r, block_c = (QUANT_BLOCK_ROWS, BLOCK) if quant else (BLOCK_ROWS, BLOCK_COLS)
        kernel[triton.cdiv(S, block_r), triton.cdiv(I, block_c)](
            *tensors, out, q, s, S, I, BLOCK_R=block_r, BLOCK_C=block_c, EXACT=tt.interpreting(), num_warps=4, **quant
        )  # fmt: skip
    return q, s


def swiglu_forward(h_SF: torch.Tensor, pow2: bool | None = None):
    """(a [S, I], a_fp8, a_scale): a = silu(h[:, :I]) * h[:, I:] for h [S, 2I], and with pow2 given a's 1x128
    quantisation (quant.quantize_act(a, pow2), bit for bit), else (a, None, None). No autograd."""
    tt.require_fp8("swiglu")  # Triton and a GPU the FP8 experts run on, or the interpreter
    assert h_SF.dim() == 2 and h_SF.shape[1] % 2 == 0, "h must be [S, 2I]"
    h_SF = h_SF.contiguous()
    S, I = h_SF.shape[0], h_SF.shape[1] // 2  # noqa: E741
    a_SI = torch.empty(S, I, dtype=h_SF.dtype, device=h_SF.device)
    return (a_SI, *_launch(_swiglu_fwd_kernel, S, I, [h_SF], a_SI, pow2))


def swiglu_backward(h_SF: torch.Tensor, da_SI: torch.Tensor, pow2: bool | None = None):
    """(dh [S, 2I], dh_fp8, dh_scale): swiglu_forward's gradient for h from da, and with pow2 given dh's 1x128
    quantisation (needs quantizes(I)), else (dh, None, None). No autograd."""
    S, I = h_SF.shape[0], h_SF.shape[1] // 2  # noqa: E741
    assert pow2 is None or quantizes(I), f"dh's 1x128 tiles would straddle gate and up (I = {I})"
    dh_SF = torch.empty_like(h_SF)
    return (dh_SF, *_launch(_swiglu_bwd_kernel, S, I, [h_SF, da_SI.to(h_SF.dtype).contiguous()], dh_SF, pow2))


class SwiGLUFunction(torch.autograd.Function):
    """a [S, I] = silu(h[:, :I]) * h[:, I:] for h [S, 2I] (see the module docstring); saves h only."""

    @staticmethod
    def forward(ctx, h_SF: torch.Tensor) -> torch.Tensor:
        h_SF = h_SF.contiguous()  # once, for the kernel and for backward
        a_SI, _, _ = swiglu_forward(h_SF)
        ctx.save_for_backward(h_SF)
        return a_SI

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, da_SI: torch.Tensor) -> torch.Tensor:
        (h_SF,) = ctx.saved_tensors
        return swiglu_backward(h_SF, da_SI)[0]


def swiglu(h_SF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [S, 2I] projection (gate columns first), differentiable: SwiGLUFunction."""
    return SwiGLUFunction.apply(h_SF)
