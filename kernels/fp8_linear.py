"""FP8 linear layers and FP8 routed experts, built on the block-scaled GEMMs.

Training (DeepSeek-V3 sec. 3.3): the master weight stays in bf16/fp32; each forward quantises it in
128x128 blocks (once per forward+backward: the same pass writes the K-major copy that dgrad reads)
and the input in 1x128 tiles, computes y in fp32-promoted FP8, and keeps for backward only FP8
tensors: the input in the 128x1 tiling that the weight-gradient GEMM reads (written by the same
pass that reads x for the 1x128 tiles), and the quantised weight. Backward quantises dy once into
both tilings (1x128 for dgrad, 128x1 for wgrad).

Routed experts (fp8_experts_forward): the wgrad's 128x1 tiles along tokens are laid out per expert, each expert's
rows padded with zeros to whole tiles (pad_experts_to_tiles), as DeepSeek's grouped GEMMs align experts: no tile
mixes two experts' tokens, and the grouped wgrad runs whole unmasked steps (1.4x faster at V3 size, padding included,
benchmarks/RESULTS.md).

Inference: `FP8InferenceLinear` holds the official checkpoint's e4m3 `weight` and fp32
`weight_scale_inv` [ceil(N/128), ceil(K/128)] and never makes a bf16 copy.

Shape legend: T tokens, D hidden, I expert intermediate, F = 2*I (gate and up fused), E experts,
Kt experts per token, S = T*Kt routed rows, M/N/K as in fp8_gemm.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# Absolute: with the repository root on sys.path, kernels/ is also importable as a top-level package (transformers
# probes for one named kernels), where a relative `from .. import` fails.
from modeling_deepseek_v3 import modeling_dsv3

# The kernels through compile_ops: plain calls in eager mode, opaque custom ops under torch.compile.
from .compile_ops import (
    fp8_gemm,
    fp8_gemm_dgrad,
    fp8_gemm_wgrad,
    fp8_gemv,
    fp8_grouped_gemm,
    fp8_grouped_gemm_dgrad,
    fp8_grouped_gemm_wgrad,
    mla_absorb_output,
    mla_absorb_query,
    quantize_act,
    quantize_act_both,
    quantize_act_t,
    quantize_weight,
    quantize_weight_t,
)
from .quant import (
    BLOCK,
    dequantize_act_ref,
    dequantize_weight_ref,
    quantize_act_ref,
    quantize_act_t_ref,
    quantize_weight_ref,
)
from .swiglu import quantizes as swiglu_quantizes
from .swiglu import swiglu, swiglu_backward, swiglu_forward

# The routed experts' SwiGLU fused with the 1x128 quantisations around it (swiglu_forward / swiglu_backward with
# pow2): the forward's a for the down projection, the backward's dh for gate_up's dgrad, each written by the SwiGLU
# kernel instead of a quantiser pass over it; in training and in FP8-checkpoint inference (fp8_experts_inference).
# Where: _swiglu_quantizes. The same bits either way (test_fp8_linear.py, test_swiglu.py). False: SwiGLU and the
# quantisers apart.
FUSE_SWIGLU_QUANT = True

# FP8InferenceLinear's forward over at most GEMV_MAX_ROWS rows (decoding a few sequences; at most fp8_gemv.MAX_ROWS)
# and a weight of at most GEMV_MAX_WEIGHT elements runs as one fp8_gemv launch (the input quantised inside it, W cut
# into hundreds of programs) instead of quantize_act and fp8_gemm, whose tiles are cut for thousands of rows.
# Measured on an H200 (benchmarks/bench_fp8_decode_gemm.py, RESULTS.md, 2026-12-01), at 1-4 rows fp8_gemv is:
# - 1.24-1.28x the two launches on V3's small projections, q_a, kv_a and the shared expert's gate and up (its down:
#   1.19x at 1 row, 0.98x at 4); all <= 14.7M elements, where the quantiser's launch and fp8_gemm's few tiles
#   dominate;
# - 0.64-0.81x on the large ones (q_b, o, the dense MLP), which fp8_gemm streams faster; kv_b (16.8M elements)
#   1.01x at 1 row, 0.68x at 4.
# At 16 rows it loses nearly everywhere. GEMV_MAX_ROWS = 0: never.
GEMV_MAX_ROWS = 4
GEMV_MAX_WEIGHT = 15 * 2**20

# ---------------------------------------------------------------------------------------------
# autograd.Functions


def _quantize_input(x_MK: torch.Tensor, pow2: bool, need_t: bool, rows=None, padded_rows=None, x_1x128=None):
    """x (or x[rows], gathered by the quantisers) in the 1x128 tiling, and (if need_t) in the 128x1 tiling too;
    padded_rows: the 128x1 tiling's rows instead (experts padded to whole tiles, pad_experts_to_tiles). x_1x128:
    x's 1x128 tiling (codes, scales), quantised already."""
    x_q = _quantize_grad(x_MK, pow2, x_1x128 is None, need_t, rows, None, padded_rows)
    return x_q if x_1x128 is None else (*x_1x128, *x_q[2:])


def _quantize_grad(dy_MN: torch.Tensor, pow2: bool, need_dx: bool, need_dw: bool, rows=None, row_scale=None,
                   padded_rows=None, padded_row_scale=None):  # fmt: skip
    """dy (or dy[rows] * row_scale, see quant.quantize_act) in the tilings that dgrad (1x128) and wgrad (128x1)
    read; padded_rows / padded_row_scale: the 128x1 tiling's rows instead (as _quantize_input)."""
    if padded_rows is not None:
        dy_q = quantize_act(dy_MN, pow2, rows, row_scale) if need_dx else (None, None)
        # The layout's trailing tiles of padding are never read by the wgrad: not written.
        dyT_q = quantize_act_t(dy_MN, pow2, padded_rows, padded_row_scale, True) if need_dw else (None, None)
        return (*dy_q, *dyT_q)
    if need_dx and need_dw:
        return quantize_act_both(dy_MN, pow2, rows, row_scale)
    if need_dx:
        return (*quantize_act(dy_MN, pow2, rows, row_scale), None, None)
    return (None, None, *quantize_act_t(dy_MN, pow2, rows, row_scale)) if need_dw else (None,) * 4


def _quantize_master_weight(weight: torch.Tensor, pow2: bool, need_t: bool, cache=None, sources=None):
    """(w_fp8, weight_scale_inv, K-major w_fp8 copy for dgrad or None), in one pass over the weight; through `cache`
    (a QuantizedWeightCache) if given, `sources` being the weights that `weight` stacks (default: itself)."""
    sources = sources or (weight,)
    if cache is not None and not cache.usable(sources[0]):
        cache = None
    if cache is not None and (hit := cache.lookup(sources, pow2, need_t)) is not None:
        return hit
    quantized = quantize_weight_t(weight.contiguous(), pow2) if need_t else (
        *quantize_weight(weight.contiguous(), pow2), None)  # fmt: skip
    if cache is not None:
        cache.store(sources, pow2, quantized)
    return quantized


class QuantizedWeightCache:
    """Keeps a layer's quantised master weight from one call to the next while the weight is unchanged, as
    Transformer Engine does across micro-batches: with gradient accumulation every micro-batch after the first, and
    forward-only calls between optimizer steps (evaluation, a GRPO rollout's generation), skip the weight's
    quantisation (in a V3-size MoE layer 11.8 ms of forward+backward on an H200, benchmarks/RESULTS.md).

    An entry is reused only while the weight is the same tensor at the same address with the same in-place version,
    and no optimizer has stepped since it was made: a global optimizer-step hook (torch.optim) counts steps, because
    FSDP2 refills its gathered parameters in place while keeping their version counter. Writes that bypass both
    (`param.data.copy_(...)` between steps) are not seen: call `clear()` after them. Eager mode only: under
    torch.compile and during CUDA-graph capture the weight is quantised on every call (a cache hit would be baked into
    the graph). The cost is memory: the e4m3 weight, its scales and (after a training call) the K-major copy stay
    alive between calls, about two bytes per parameter. Off unless the config's `fp8_weight_cache` is set."""

    _optimizer_steps = 0  # optimizer steps since import, counted by the hook below
    _hook = None

    def __init__(self) -> None:
        self._entries: dict = {}
        if QuantizedWeightCache._hook is None:
            QuantizedWeightCache._hook = register_optimizer_step_post_hook(QuantizedWeightCache._count_step)

    @staticmethod
    def _count_step(optimizer, args, kwargs) -> None:
        QuantizedWeightCache._optimizer_steps += 1

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickle: torch.save of a whole module) starts empty: the entries hold weak references,
        # which do not pickle, and device memory that a copy should not duplicate.
        return {"_entries": {}}

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        """Whether this call may read or fill the cache: not while torch.compile traces or a CUDA graph captures."""
        return not (torch.compiler.is_compiling() or (weight.is_cuda and torch.cuda.is_current_stream_capturing()))

    @staticmethod
    def _stamp(sources: tuple[torch.Tensor, ...]) -> tuple:
        return QuantizedWeightCache._optimizer_steps, tuple((w.data_ptr(), w._version) for w in sources)

    def lookup(self, sources: tuple[torch.Tensor, ...], pow2: bool, need_t: bool):
        """The quantised weight stored for these weights (stacked along rows), or None where it is stale or lacks the
        K-major copy that need_t asks for."""
        entry = self._entries.get((tuple(map(id, sources)), pow2))
        if entry is None:
            return None
        refs, stamp, quantized = entry
        alive = all(r() is w for r, w in zip(refs, sources, strict=True))  # ids can be reused by new tensors
        fresh = alive and stamp == self._stamp(sources)
        return quantized if fresh and (quantized[2] is not None or not need_t) else None

    def store(self, sources: tuple[torch.Tensor, ...], pow2: bool, quantized: tuple) -> None:
        entry = (tuple(map(weakref.ref, sources)), self._stamp(sources), quantized)
        self._entries[(tuple(map(id, sources)), pow2)] = entry


def _needs_grads(ctx, grad_enabled: bool) -> tuple[bool, bool]:
    """(dx needed, dW needed). Under torch.no_grad ctx.needs_input_grad still reports the weight's requires_grad,
    so the caller passes torch.is_grad_enabled() and a forward-only call skips the backward-only copies (the 128x1
    tiling of x, the K-major weight)."""
    return ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with FP8 forward, dgrad and wgrad (no bias; add it outside in high precision). weight_cache: a
    QuantizedWeightCache that may hold the quantised weight, with weight_sources the parameters that weight_NK is
    (or stacks)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight_NK: torch.Tensor, pow2: bool = False, grad_enabled: bool = True,
        weight_cache: QuantizedWeightCache | None = None, weight_sources: tuple | None = None,
    ) -> torch.Tensor:  # fmt: skip
        N, K = weight_NK.shape
        x_MK = x.reshape(-1, K).contiguous()  # [M, K], M = all leading dims
        need_dx, need_dw = _needs_grads(ctx, grad_enabled)
        x_q, x_s, xT_q, xT_s = _quantize_input(x_MK, pow2, need_dw)
        w_q, w_s, wT_q = _quantize_master_weight(weight_NK, pow2, need_dx, weight_cache, weight_sources)
        y_MN = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=x.dtype)
        # Only FP8 is saved: the 128x1 tiling of x (what wgrad reads; the 1x128 copy is dead now)
        # and the K-major quantised weight (dgrad reads it; no second quantisation of W).
        ctx.save_for_backward(xT_q, xT_s, wT_q, w_s)
        ctx.pow2, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2, x.shape, x.dtype, weight_NK.dtype
        return y_MN.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xT_q, xT_s, wT_q, w_s = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy_MN = dy.reshape(-1, dy.shape[-1]).contiguous()  # [M, N]
        dy_q, dy_s, dyT_q, dyT_s = _quantize_grad(dy_MN, ctx.pow2, need_dx, need_dw)
        dx = dw = None
        if need_dx:
            dx = fp8_gemm_dgrad(dy_q, dy_s, wT_q, w_s, ctx.x_dtype).view(ctx.x_shape)
        if need_dw:
            dw = fp8_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, out_dtype=ctx.w_dtype)
        return dx, dw, None, None, None, None


def pad_experts_to_tiles(offs_E: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed rows laid out for the grouped wgrad with every expert padded to whole 128-token scale tiles, built
    on the device (no sync): (row_P, offs_P). row_P [P] (int64): the routed row (an index into the S rows, sorted by
    expert) at each padded position, -1 for padding (a row of zeros to the quantisers); offs_P [E] (int32): the
    padded cumulative counts, multiples of 128. P is a static bound, the largest multiple of 128 not above
    S + min(E, S) * 127 (each expert with tokens adds at most 127 rows of padding, and the padded total is a
    multiple of 128), so positions from offs_P[-1] on are padding too; the wgrad never reads them."""
    E = offs_E.numel()
    ends = offs_E.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = ends - starts
    padded = (counts + BLOCK - 1) // BLOCK * BLOCK
    padded_ends = padded.cumsum(0)
    P = (S + min(E, S) * (BLOCK - 1)) // BLOCK * BLOCK
    pos = torch.arange(P, device=offs_E.device)
    e = torch.searchsorted(padded_ends, pos, right=True).clamp(max=E - 1)  # skips experts padded to nothing
    rank = pos - (padded_ends - padded)[e]
    row_P = torch.where((rank < counts[e]) & (pos < padded_ends[-1:]), starts[e] + rank, -1)
    return row_P, padded_ends.to(torch.int32)


def _rows_at(row_P: torch.Tensor, index_S: torch.Tensor) -> torch.Tensor:
    """index_S[row] at each padded position (row_P of pad_experts_to_tiles), -1 kept for padding."""
    return torch.where(row_P >= 0, index_S[row_P.clamp(min=0)], -1)


def _grouped_forward(ctx, x, weight_ENK, offs_E, pow2, weight_cache, grad_enabled, rows_S=None, padded=None,
                     x_1x128=None):  # fmt: skip
    """The FP8 grouped GEMM of both grouped Functions: y_SN; saves on ctx what _grouped_backward needs.
    padded: (x's row at each padded position, offs_P), the wgrad's layout (pad_experts_to_tiles), or None for the
    rows as they are. x_1x128: as _quantize_input's."""
    need_dx, need_dw = _needs_grads(ctx, grad_enabled)
    x_rows_P, offs_W = padded if padded is not None else (None, offs_E)
    x_q, x_s, xT_q, xT_s = _quantize_input(x, pow2, need_dw, rows_S, x_rows_P, x_1x128)
    w_q, w_s, wT_q = _quantize_master_weight(weight_ENK, pow2, need_dx, weight_cache)
    y_SN = fp8_grouped_gemm(x_q, x_s, w_q, w_s, offs_E, out_dtype=x.dtype)
    ctx.pow2, ctx.x_dtype, ctx.w_dtype, ctx.tokens_aligned = pow2, x.dtype, weight_ENK.dtype, padded is not None
    return y_SN, (xT_q, xT_s, wT_q, w_s, offs_E, offs_W)


def _grouped_backward(ctx, saved, dy_q, dy_s, dyT_q, dyT_s):
    """(dx_SK, dW) of _grouped_forward from dy in both tilings (None where not needed)."""
    xT_q, xT_s, wT_q, w_s, offs_E, offs_W = saved
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = fp8_grouped_gemm_dgrad(dy_q, dy_s, wT_q, w_s, offs_E, ctx.x_dtype)
    if ctx.needs_input_grad[1]:
        dw = fp8_grouped_gemm_wgrad(dyT_q, dyT_s, xT_q, xT_s, offs_W, ctx.w_dtype, ctx.tokens_aligned)
    return dx, dw


class FP8GroupedLinearFunction(torch.autograd.Function):
    """y[rows_e] = x[rows_e] W[e]^T for tokens sorted by expert; FP8 forward and backward.

    `weight_cache`, if given, is a QuantizedWeightCache that may hold the quantised `weight_ENK` (which must then be
    the parameter itself).

    `rows_S`, if given, makes the grouped input x[rows_S] (x [T, K]; the routed experts' first projection reads
    each token once per expert it goes to): the quantisers gather the rows as they read them, so the [S, K] copy
    is never written in x's dtype. dx sums each token's rows back in fp32 (_sum_slots, which needs `slots_TK`, the
    row of each (token, slot), along with rows_S), where autograd's backward of x[rows_S] would scatter-add them in
    x's dtype.

    `padded`, if given, is (row_P, offs_P) of pad_experts_to_tiles: the wgrad's operands are quantised in that
    layout (each expert's rows padded to whole 128-token tiles) and its GEMM runs whole steps only. Without it the
    128x1 tiles run over all S rows, a tile at an expert boundary shared by two experts.

    `swiglu_out`: apply SwiGLU to y (N = 2I, gate columns first) and return (a, a_fp8, a_scale), a's 1x128
    tiling from the SwiGLU kernel (swiglu_forward; not differentiable) for the next projection to take; the
    backward takes da, and the SwiGLU backward kernel quantises dh for the dgrad (FUSE_SWIGLU_QUANT).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight_ENK: torch.Tensor, offs_E: torch.Tensor, pow2: bool = False,
        weight_cache: QuantizedWeightCache | None = None, grad_enabled: bool = True, rows_S: torch.Tensor | None = None,
        slots_TK: torch.Tensor | None = None, padded: tuple | None = None, swiglu_out: bool = False,
    ):  # fmt: skip
        assert (rows_S is None) == (slots_TK is None), "a gathered input needs both rows_S and slots_TK"
        x = x.contiguous()
        row_P, offs_P = padded if padded is not None else (None, None)
        x_padded = None if row_P is None else (row_P if rows_S is None else _rows_at(row_P, rows_S), offs_P)
        y_SN, saved = _grouped_forward(ctx, x, weight_ENK, offs_E, pow2, weight_cache, grad_enabled, rows_S,
                                       x_padded)  # fmt: skip
        ctx.swiglu_out = swiglu_out
        h_SF = y_SN if swiglu_out else None  # SwiGLU's backward reads it
        ctx.save_for_backward(*saved, rows_S, slots_TK, row_P, h_SF)
        if not swiglu_out:
            return y_SN
        a_SI, a_q, a_s = swiglu_forward(y_SN, pow2)
        ctx.mark_non_differentiable(a_q, a_s)
        ctx.set_materialize_grads(False)  # no zero gradients made for a_q and a_s
        return a_SI, a_q, a_s

    @staticmethod
    def backward(ctx, dy_SN: torch.Tensor, *_):
        *saved, rows_S, slots_TK, row_P, h_SF = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.swiglu_out:  # dy is da: dh, and its 1x128 tiling from the same kernel
            dh_SF, dh_q, dh_s = swiglu_backward(h_SF, dy_SN, ctx.pow2 if need_dx else None)
            dy = (dh_q, dh_s, *_quantize_grad(dh_SF, ctx.pow2, False, need_dw, padded_rows=row_P)[2:])
        else:
            dy = _quantize_grad(dy_SN.contiguous(), ctx.pow2, need_dx, need_dw, padded_rows=row_P)
        dx, dw = _grouped_backward(ctx, saved, *dy)
        if dx is not None and slots_TK is not None:
            dx = modeling_dsv3._sum_slots(dx, (None, rows_S, slots_TK))
        return dx, dw, None, None, None, None, None, None, None, None


class FP8GroupedLinearCombineFunction(torch.autograd.Function):
    """The routed experts' last projection and their top-k combine in one:
    out[t] = sum over k of weight_TK[t, k] * x[s] W[e(s)]^T with s = row_TK[t, k], summed in fp32 (_sum_slots; the
    routing tensors as _sort_by_expert returns them).
    Apart, autograd would hand the backward dy_S = dout[token_S] * weight_S written out in full ([S, N], each
    token's gradient repeated per expert); here the quantisers read it straight from dout (quant.quantize_act's rows
    and row_scale), with the same bf16 product. weight_TK: the routing weights, in x's dtype. padded and
    weight_cache: as FP8GroupedLinearFunction's. x_1x128: x's 1x128 tiling, quantised already (by the SwiGLU
    kernel: FP8GroupedLinearFunction's swiglu_out), or None."""

    @staticmethod
    def forward(
        ctx, x_SK: torch.Tensor, weight_ENK: torch.Tensor, offs_E: torch.Tensor, order_S: torch.Tensor,
        token_S: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor, pow2: bool = False,
        grad_enabled: bool = True, padded: tuple | None = None, weight_cache: QuantizedWeightCache | None = None,
        x_1x128: tuple | None = None,
    ) -> torch.Tensor:  # fmt: skip
        y_SN, saved = _grouped_forward(ctx, x_SK.contiguous(), weight_ENK, offs_E, pow2, weight_cache, grad_enabled,
                                       padded=padded, x_1x128=x_1x128)  # fmt: skip
        weight_S = weight_TK.reshape(-1)[order_S]  # the weight of each row, in row order
        row_P = padded[0] if padded is not None else None
        ctx.save_for_backward(*saved, token_S, row_TK, weight_S, y_SN, row_P)  # y for the routing weights' gradient
        return modeling_dsv3._sum_slots(y_SN, (order_S, token_S, row_TK), weight_TK)

    @staticmethod
    def backward(ctx, dout_TN: torch.Tensor):
        *saved, token_S, row_TK, weight_S, y_SN, row_P = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dout_TN = dout_TN.contiguous()
        padded_rows = padded_scale = None
        if row_P is not None:  # the wgrad's rows dout[token] * weight, in the padded layout
            padded_rows, padded_scale = _rows_at(row_P, token_S), weight_S[row_P.clamp(min=0)]
        dy = _quantize_grad(dout_TN, ctx.pow2, need_dx, need_dw, token_S, weight_S, padded_rows, padded_scale)
        dx, dw = _grouped_backward(ctx, saved, *dy)
        dweight = modeling_dsv3._slot_dots(dout_TN, y_SN, row_TK) if ctx.needs_input_grad[6] else None
        return dx, dw, None, None, None, None, dweight, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Modules


class FP8Linear(nn.Linear):
    """Drop-in nn.Linear (same `weight`/`bias`) whose matmuls run in block-scaled FP8.

    The bias, if any, is added in the activation dtype after the FP8 GEMM. Under autocast the input is cast to the
    autocast dtype first, as for nn.Linear. cache_weight: keep the quantised weight while it is unchanged
    (QuantizedWeightCache: gradient-accumulation micro-batches and forward-only calls skip its quantisation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 pow2_scales: bool = False, cache_weight: bool = False) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scales = pow2_scales
        self.weight_cache = QuantizedWeightCache() if cache_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = modeling_dsv3.to_autocast_dtype(x)  # as autocast casts nn.Linear's input
        y = FP8LinearFunction.apply(x, self.weight, self.pow2_scales, torch.is_grad_enabled(), self.weight_cache,
                                    (self.weight,))  # fmt: skip
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @staticmethod
    def forward_shared_input(x: torch.Tensor, layers) -> tuple[torch.Tensor, ...]:
        """layer(x) for several FP8Linear layers that read the same x (MLA's q_a and kv_a projections, an MLP's gate
        and up): one FP8 GEMM on the stacked weights, so x is quantised once and the kernels launch once, which is
        what an eager FP8 step is short of (host-bound: benchmarks/RESULTS.md). Stacking keeps every 128x128 weight
        block as it is apart when all widths but the last are multiples of 128; elsewhere (and for layers with a
        bias, hooks, or other scale formats) the layers run one by one. The forward computes what the layers apart
        compute (the same x tiles and weight blocks; equal outputs under the interpreter); the input gradient sums
        the layers' contributions in fp32 before its one rounding instead of after two."""
        y = FP8Linear._stacked(x, layers)
        if y is None:
            return tuple(layer(x) for layer in layers)
        return y.split([layer.out_features for layer in layers], dim=-1)

    @staticmethod
    def forward_gated(x: torch.Tensor, gate_proj: FP8Linear, up_proj: FP8Linear, act) -> torch.Tensor:
        """act(gate_proj(x)) * up_proj(x), an MLP's input to its down projection: forward_shared_input's one GEMM,
        whose [.., 2I] output (gate columns first) goes to _gated whole, so that SwiGLU (act F.silu) runs as
        swiglu's one kernel each way in eager mode instead of five torch kernels (in a V3-size MoE layer's
        forward+backward on an H200 the shared expert's took 0.22 ms, benchmarks/RESULTS.md, session 16)."""
        width = gate_proj.out_features
        y = FP8Linear._stacked(x, (gate_proj, up_proj)) if up_proj.out_features == width else None
        if y is None:  # not stackable (or unequal halves): the layers apart, as forward_shared_input would run them
            return act(gate_proj(x)) * up_proj(x)
        return _gated(y.reshape(-1, 2 * width), act).view(*y.shape[:-1], width)

    @staticmethod
    def _stacked(x: torch.Tensor, layers) -> torch.Tensor | None:
        """The layers' outputs side by side from one FP8 GEMM on their stacked weights, or None where they do not
        stack (forward_shared_input's conditions)."""
        first = layers[0]
        stackable = (
            len(layers) > 1
            and all(type(layer) is FP8Linear and layer.bias is None and layer.pow2_scales == first.pow2_scales
                    and not (layer._forward_hooks or layer._forward_pre_hooks) for layer in layers)
            and all(layer.out_features % BLOCK == 0 for layer in layers[:-1])
        )  # fmt: skip
        if not stackable:
            return None
        sources = tuple(layer.weight for layer in layers)
        x = modeling_dsv3.to_autocast_dtype(x)
        return FP8LinearFunction.apply(x, torch.cat(sources), first.pow2_scales, torch.is_grad_enabled(),
                                       first.weight_cache, sources)  # fmt: skip

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False, cache_weight: bool = False) -> FP8Linear:
        """Wrap an existing nn.Linear, sharing its parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.pow2_scales = linear.in_features, linear.out_features, pow2_scales
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_cache = QuantizedWeightCache() if cache_weight else None
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pow2_scales={self.pow2_scales}, cache_weight={self.weight_cache is not None}"


class FP8InferenceLinear(nn.Module):
    """Inference linear over an official FP8 checkpoint's tensors: e4m3 `weight` [N, K] and fp32
    `weight_scale_inv` [ceil(N/128), ceil(K/128)]; about one byte per parameter, no bf16 copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        w = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        nb, kb = math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK)
        self.register_buffer("weight_scale_inv", torch.ones(nb, kb, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, self.in_features).contiguous()  # [M, K]
        if x_MK.shape[0] <= GEMV_MAX_ROWS and self.weight.numel() <= GEMV_MAX_WEIGHT:
            y = fp8_gemv(x_MK, self.weight, self.weight_scale_inv, x.dtype)
        else:
            x_q, x_s = quantize_act(x_MK, False)
            y = fp8_gemm(x_q, x_s, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False) -> FP8InferenceLinear:
        """Quantise a float nn.Linear (torch reference quantiser: same bits as the kernel, runs anywhere)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip
        w_q, w_s = quantize_weight_ref(linear.weight.detach(), pow2_scales)
        new.weight.data.copy_(w_q)
        new.weight_scale_inv.copy_(w_s)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_weight_ref(self.weight, self.weight_scale_inv, dtype)

    def absorb_query(self, q_nope: torch.Tensor, v: int) -> torch.Tensor:
        """With this layer as MLA's kv_b_proj ([H * (n + v), R]), absorbed decoding's query product q_nope . W_UK per
        head: [..., H, n] -> [..., H, R], from the e4m3 weight and its scales (kernels/mla_absorb.py)."""
        *lead, H, n = q_nope.shape
        return mla_absorb_query(q_nope.reshape(-1, H, n), self.weight, self.weight_scale_inv, v).view(*lead, H, -1)

    def absorb_output(self, o_lat: torch.Tensor, n: int, v: int) -> torch.Tensor:
        """absorb_query's counterpart for the attention output: o_lat . W_UV^T per head, [..., H, R] -> [..., H, v]."""
        *lead, H, R = o_lat.shape
        return mla_absorb_output(o_lat.reshape(-1, H, R), self.weight, self.weight_scale_inv, n, v).view(*lead, H, v)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------
# Routed experts


def _sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int):
    """Order of the S = T*Kt routed rows by expert, their token, the row of each (token, slot) [T, Kt] (the inverse
    order), and the int32 end offsets [E]."""
    flat_S = topk_idx_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    token_S = order_S // topk_idx_TK.shape[1]
    row_S = torch.empty_like(order_S)
    row_S[order_S] = torch.arange(order_S.shape[0], device=order_S.device)
    # Counted by scatter_add, not torch.bincount: CUDA's bincount reads max(idx) back to size its output, a host
    # sync in every MoE layer that stalls the launch queue (and breaks CUDA-graph capture). The model's twin is
    # modeling_dsv3.count_per_expert; kernels/ does not import the model (it also loads on its own).
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat_S.device)
    offs_E = counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S)).cumsum(0).to(torch.int32)
    return order_S, token_S, row_S.view(topk_idx_TK.shape), offs_E


def _swiglu_quantizes(act: Callable[[torch.Tensor], torch.Tensor], I: int) -> bool:  # noqa: E741
    """Whether the routed experts' SwiGLU kernel also quantises its output (FUSE_SWIGLU_QUANT): eager mode, F.silu,
    and I (half the gate/up width) a multiple of 128."""
    return FUSE_SWIGLU_QUANT and act is F.silu and not torch.compiler.is_compiling() and swiglu_quantizes(I)


def _gated(h_SF: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(gate) * up of the fused [S, 2I] projection: for F.silu in eager mode swiglu's kernels (one each way),
    otherwise torch ops (which inductor fuses under torch.compile)."""
    if act is F.silu and not torch.compiler.is_compiling():
        return swiglu(h_SF)
    gate_SI, up_SI = h_SF.chunk(2, dim=-1)
    return act(gate_SI) * up_SI


def fp8_experts_forward(
    hidden_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    pow2_scales: bool = False,
    weight_cache: QuantizedWeightCache | None = None,
) -> torch.Tensor:
    """Routed-experts output sum_k w_tk * down_e(act(gate_e(x_t)) * up_e(x_t)) in FP8, differentiable.

    Weights use transformers' fused layout: gate_up_proj [E, 2*I, D] (gate rows first, then up),
    down_proj [E, D, I]. The top-k weighted sum is accumulated in fp32 (_sum_slots). Neither the routed input rows
    nor their output gradient are written out in bf16 (the quantisers gather them: FP8GroupedLinearFunction's
    rows_S, FP8GroupedLinearCombineFunction). With gradients on, the weight gradients' operands are quantised per
    expert, padded to whole 128-token tiles (pad_experts_to_tiles). weight_cache: a QuantizedWeightCache that may
    hold both quantised weights (the parameters themselves must be passed then). act: see _gated (the model passes
    F.silu itself for hidden_act "silu").
    """
    E = gate_up_proj_EFD.shape[0]
    order_S, token_S, row_TK, offs_E = _sort_by_expert(topk_idx_TK, E)
    grad = torch.is_grad_enabled()
    padded = pad_experts_to_tiles(offs_E, token_S.shape[0]) if grad else None  # the wgrad's layout
    gate_up = (hidden_TD, gate_up_proj_EFD, offs_E, pow2_scales, weight_cache, grad, token_S, row_TK, padded)
    if _swiglu_quantizes(act, gate_up_proj_EFD.shape[1] // 2):
        a_SI, *a_1x128 = FP8GroupedLinearFunction.apply(*gate_up, True)
    else:
        a_SI, a_1x128 = _gated(FP8GroupedLinearFunction.apply(*gate_up), act), None
    weight_TK = topk_weight_TK.to(a_SI.dtype)
    return FP8GroupedLinearCombineFunction.apply(
        a_SI, down_proj_EDI, offs_E, order_S, token_S, row_TK, weight_TK, pow2_scales, grad, padded, weight_cache,
        a_1x128,
    )


@torch.no_grad()
def fp8_experts_inference(
    hidden_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gate_up_q_EFD: torch.Tensor,
    gate_up_scale_inv: torch.Tensor,
    down_q_EDI: torch.Tensor,
    down_scale_inv: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Routed experts over checkpoint-quantised weights (e4m3 + weight_scale_inv per 128x128 block, stacked per
    expert): the activations are quantised 1x128 on the fly, the weights are never dequantised."""
    order_S, token_S, row_TK, offs_E = _sort_by_expert(topk_idx_TK, gate_up_q_EFD.shape[0])
    x_q, x_s = quantize_act(hidden_TD.contiguous(), False, token_S)  # [S, D] rows grouped by expert
    h_SF = fp8_grouped_gemm(x_q, x_s, gate_up_q_EFD, gate_up_scale_inv, offs_E, out_dtype=hidden_TD.dtype)
    if _swiglu_quantizes(act, h_SF.shape[1] // 2):
        _, a_q, a_s = swiglu_forward(h_SF, False)
    else:
        a_q, a_s = quantize_act(_gated(h_SF, act).contiguous(), False)
    y_SD = fp8_grouped_gemm(a_q, a_s, down_q_EDI, down_scale_inv, offs_E, out_dtype=hidden_TD.dtype)
    return modeling_dsv3._sum_slots(y_SD, (order_S, token_S, row_TK), topk_weight_TK)


# ---------------------------------------------------------------------------------------------
# Torch references: the same FP8 recipe (same quantisers, bit for bit), matmuls in fp32


class FP8LinearRefFunction(torch.autograd.Function):
    """Reference of FP8LinearFunction: torch quantisers, dequantise, fp32 matmul."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_NK: torch.Tensor, pow2: bool = False) -> torch.Tensor:
        N, K = weight_NK.shape
        x_MK = x.reshape(-1, K)
        w = dequantize_weight_ref(*quantize_weight_ref(weight_NK, pow2), torch.float32)
        y = dequantize_act_ref(*quantize_act_ref(x_MK, pow2)) @ w.t()
        ctx.save_for_backward(dequantize_act_ref(*quantize_act_t_ref(x_MK, pow2)), w)
        ctx.pow2, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2, x.shape, x.dtype, weight_NK.dtype
        return y.to(x.dtype).view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xT_KM, w_NK = ctx.saved_tensors
        dy_MN = dy.reshape(-1, w_NK.shape[0])
        dx = dequantize_act_ref(*quantize_act_ref(dy_MN, ctx.pow2)) @ w_NK
        dw = dequantize_act_ref(*quantize_act_t_ref(dy_MN, ctx.pow2)) @ xT_KM.t()
        return dx.to(ctx.x_dtype).view(ctx.x_shape), dw.to(ctx.w_dtype), None


class FP8GroupedLinearRefFunction(torch.autograd.Function):
    """Reference of FP8GroupedLinearFunction: a loop over experts of the dense reference recipe.

    The 128x1 tiles of the wgrad operands run over all S rows (FP8GroupedLinearFunction without `padded`) or, with
    expert_tiles, over each expert's rows alone (with `padded`: zero padding to whole tiles leaves every tile's
    maximum, and so its scale and codes, as they are).
    """

    @staticmethod
    def forward(ctx, x_SK, weight_ENK, offs_E, pow2: bool = False, expert_tiles: bool = False):
        w = dequantize_weight_ref(*quantize_weight_ref(weight_ENK, pow2), torch.float32)  # [E, N, K]
        x = dequantize_act_ref(*quantize_act_ref(x_SK, pow2))
        ranges = list(zip([0] + offs_E.tolist()[:-1], offs_E.tolist(), strict=True))
        y = x.new_zeros(x.shape[0], w.shape[1])
        for e, (s, t) in enumerate(ranges):
            y[s:t] = x[s:t] @ w[e].t()
        ctx.ranges, ctx.pow2, ctx.x_dtype, ctx.w_dtype = ranges, pow2, x_SK.dtype, weight_ENK.dtype
        ctx.expert_tiles = expert_tiles
        ctx.save_for_backward(FP8GroupedLinearRefFunction._tiled_t(ctx, x_SK), w)
        return y.to(x_SK.dtype)

    @staticmethod
    def _tiled_t(ctx, x_SK):
        """x in the 128x1 tiling along tokens, dequantised: [K, S]."""
        if not ctx.expert_tiles:
            return dequantize_act_ref(*quantize_act_t_ref(x_SK, ctx.pow2))
        parts = [dequantize_act_ref(*quantize_act_t_ref(x_SK[s:t], ctx.pow2)) for s, t in ctx.ranges]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, dy_SN):
        xT_KS, w = ctx.saved_tensors
        dy = dequantize_act_ref(*quantize_act_ref(dy_SN, ctx.pow2))
        dyT = FP8GroupedLinearRefFunction._tiled_t(ctx, dy_SN)
        dx = dy.new_zeros(dy.shape[0], w.shape[2])
        dw = torch.zeros_like(w)
        for e, (s, t) in enumerate(ctx.ranges):
            dx[s:t] = dy[s:t] @ w[e]
            dw[e] = dyT[:, s:t] @ xT_KS[:, s:t].t()
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None, None


def experts_forward_ref(
    hidden_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    pow2_scales: bool = False,
    fp8: bool = True,
) -> torch.Tensor:
    """Reference of fp8_experts_forward (the wgrad's tiles per expert, as its padded layout makes them); with
    fp8=False, the plain high-precision experts."""
    E = gate_up_proj_EFD.shape[0]
    order_S, token_S, row_TK, offs_E = _sort_by_expert(topk_idx_TK, E)
    x_SD = hidden_TD[token_S]
    if fp8:
        linear = lambda x, w: FP8GroupedLinearRefFunction.apply(x, w, offs_E, pow2_scales, True)
    else:
        counts = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).tolist()
        linear = lambda x, w: torch.cat([xe @ we.t() for xe, we in zip(x.split(counts), w, strict=True)])
    h_SF = linear(x_SD, gate_up_proj_EFD)
    gate_SI, up_SI = h_SF.chunk(2, dim=-1)
    y_SD = linear(act(gate_SI) * up_SI, down_proj_EDI)
    return modeling_dsv3._sum_slots(y_SD, (order_S, token_S, row_TK), topk_weight_TK)
