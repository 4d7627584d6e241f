"""SwiGLU of the fused gate/up projection as one Triton kernel each way, for the FP8 experts in eager mode.

    a = silu(gate) * up,  gate = h[:, :I], up = h[:, I:]

Forward reads h once and writes a; backward reads h and da once and writes dh = [dgate, dup] in place of the
five kernels eager autograd runs (silu, mul; their two backwards and the `cat` of chunk's backward, three of them on
strided halves of h), and without keeping silu(gate) alive for backward (only h, which the caller keeps anyway).
Each intermediate is rounded to h's dtype where torch's eager ops round it (silu(gate), then the product; in
backward da * up, da * silu(gate), then the silu derivative's product), with torch's formulas in fp32, so the
results are torch's up to the last bit of exp (test_swiglu.py bounds it). Under torch.compile the caller keeps the
torch expression, which inductor fuses itself.

Shape legend: S rows, I = half of h's width.
"""

from __future__ import annotations

import torch

from . import _triton as tt

triton, tl = tt.triton, tt.tl

BLOCK_ROWS, BLOCK_COLS = 8, 256  # a tile of a: 2048 elements, 16 a thread at 4 warps

if tt.HAS_TRITON:
    from .quant import _round_to

    @triton.jit
    def _load_gate_up(h_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # noqa: E741
        # This program's tile: gate and up in fp32, the gate's offsets in h [S, 2I] (up's are I further), the mask,
        # and the tile's offsets in an [S, I] tensor (a, da).
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < S)[:, None] & (cols < I)[None, :]
        offs = rows[:, None] * (2 * I) + cols[None, :]
        g = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + offs + I, mask=mask, other=0.0).to(tl.float32)
        return g, u, offs, mask, rows[:, None] * I + cols[None, :]

    @triton.jit
    def _silu_rounded(g, DTYPE: tl.constexpr):
        # torch's silu: x / (1 + exp(-x)) in fp32, rounded to the tensor's dtype.
        return _round_to(g / (1.0 + tl.exp(-g)), DTYPE)

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, a_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # noqa: E741
        g, u, _, mask, a_offs = _load_gate_up(h_ptr, S, I, BLOCK_R, BLOCK_C)
        DTYPE: tl.constexpr = a_ptr.dtype.element_ty
        a = _round_to(_silu_rounded(g, DTYPE) * u, DTYPE)
        tl.store(a_ptr + a_offs, a.to(DTYPE), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(h_ptr, da_ptr, dh_ptr, S, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # noqa: E741
        g, u, offs, mask, a_offs = _load_gate_up(h_ptr, S, I, BLOCK_R, BLOCK_C)
        DTYPE: tl.constexpr = dh_ptr.dtype.element_ty
        da = tl.load(da_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
        d_up = _round_to(da * _silu_rounded(g, DTYPE), DTYPE)  # mul's backward: da * silu(gate)
        d_silu = _round_to(da * u, DTYPE)  # and da * up
        # torch's silu_backward: dy * sigmoid * (1 + x * (1 - sigmoid)), in fp32
        sig = 1.0 / (1.0 + tl.exp(-g))
        d_gate = _round_to(d_silu * sig * (1.0 + g * (1.0 - sig)), DTYPE)
        tl.store(dh_ptr + offs, d_gate.to(DTYPE), mask=mask)
        tl.store(dh_ptr + offs + I, d_up.to(DTYPE), mask=mask)


def _grid(S: int, I: int) -> tuple[int, int]:  # noqa: E741
    return triton.cdiv(S, BLOCK_ROWS), triton.cdiv(I, BLOCK_COLS)


class SwiGLUFunction(torch.autograd.Function):
    """a [S, I] = silu(h[:, :I]) * h[:, I:] for h [S, 2I] (see the module docstring); saves h only."""

    @staticmethod
    def forward(ctx, h_SF: torch.Tensor) -> torch.Tensor:
        tt.require_fp8("swiglu")  # Triton and a GPU the FP8 experts run on, or the interpreter
        assert h_SF.dim() == 2 and h_SF.shape[1] % 2 == 0, "h must be [S, 2I]"
        h_SF = h_SF.contiguous()
        S, I = h_SF.shape[0], h_SF.shape[1] // 2  # noqa: E741
        a_SI = torch.empty(S, I, dtype=h_SF.dtype, device=h_SF.device)
        if a_SI.numel():
            _swiglu_fwd_kernel[_grid(S, I)](h_SF, a_SI, S, I, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, num_warps=4)
        ctx.save_for_backward(h_SF)
        return a_SI

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, da_SI: torch.Tensor) -> torch.Tensor:
        (h_SF,) = ctx.saved_tensors
        S, I = h_SF.shape[0], h_SF.shape[1] // 2  # noqa: E741
        dh_SF = torch.empty_like(h_SF)
        if dh_SF.numel():
            _swiglu_bwd_kernel[_grid(S, I)](h_SF, da_SI.to(h_SF.dtype).contiguous(), dh_SF, S, I,
                                            BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, num_warps=4)  # fmt: skip
        return dh_SF


def swiglu(h_SF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [S, 2I] projection (gate columns first), differentiable: SwiGLUFunction."""
    return SwiGLUFunction.apply(h_SF)
