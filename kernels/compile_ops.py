"""The FP8 kernels as torch custom ops while torch.compile traces, plain calls otherwise.

A Triton (or Gluon) launch is not something TorchDynamo should trace into: it would break the graph
(as it does for the interpreter's kernels) or try to analyse a kernel it does not know (Gluon). As
custom ops (`torch.ops.dsv3.*`) with a fake implementation that gives the output shapes, the
launches stay opaque nodes and an FP8 layer compiles as one graph (`compile_layers()`, `dsv3 train
--compile --fp8`). In eager mode the same names call the kernels directly: the dispatcher's
per-call cost would land on a path that is already host-bound (benchmarks/RESULTS.md).

The activation quantisers stay opaque too. Tracing them as their torch references instead, for inductor
to fuse into the op that produces the activation, was measured (benchmarks/RESULTS.md, session 5): the
FP8 train step fell from 1.75x to 1.43x the built-in on an H200; there inductor's codes and scales
differed from the kernels' at 256 x 672 (a ragged last tile; not traced further), and on the CPU its C++
code miscomputed such a tile outright (torch 2.13).

FP8LinearFunction / FP8GroupedLinearFunction (fp8_linear.py) call these, so their forward and
backward trace without a break. Shape legend as in fp8_gemm.py; Xb = ceil(X / 128).
"""

from __future__ import annotations

import functools

import torch

from . import quant as _quant
from .fp8_gemm import fp8_gemm as _fp8_gemm
from .fp8_gemm import fp8_gemm_dgrad as _fp8_gemm_dgrad
from .fp8_gemm import fp8_gemm_wgrad as _fp8_gemm_wgrad
from .fp8_gemv import fp8_gemv as _fp8_gemv
from .fp8_grouped_gemm import fp8_grouped_gemm as _fp8_grouped_gemm
from .fp8_grouped_gemm import fp8_grouped_gemm_dgrad as _fp8_grouped_gemm_dgrad
from .fp8_grouped_gemm import fp8_grouped_gemm_wgrad as _fp8_grouped_gemm_wgrad
from .mla_absorb import absorb_output as _absorb_output
from .mla_absorb import absorb_query as _absorb_query
from .quant import BLOCK

E4M3, F32 = torch.float8_e4m3fn, torch.float32


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _opaque(name: str, fake):
    """Register `fn` as the custom op dsv3::name (outputs shaped by `fake`); return a function that calls the op
    while torch.compile traces and `fn` itself otherwise."""

    def wrap(fn):
        if hasattr(torch.ops.dsv3, name):  # this file imported a second time (e.g. under another module name)
            op = getattr(torch.ops.dsv3, name)
        else:
            op = torch.library.custom_op(f"dsv3::{name}", mutates_args=())(fn)
            op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

        return call

    return wrap


# ---------------------------------------------------------------------------------------------
# Quantisation


def _step_major_scales(x, M):
    """The 128x1 tiling's scales [K, Mb] as quant.quantize_act_t returns them: a view of [Mb, K] storage (a custom
    op's fake must give its real output's strides)."""
    return x.new_empty(_blocks(M), x.shape[1], dtype=F32).t()


def _rows_of(x, rows):
    """Rows of the quantised X: x's, or as many as the gather index has (quant.quantize_act's rows)."""
    return x.shape[0] if rows is None else rows.shape[0]


@_opaque("quantize_act", lambda x, pow2, rows=None, row_scale=None: (x.new_empty(_rows_of(x, rows), x.shape[1], dtype=E4M3), x.new_empty(_rows_of(x, rows), _blocks(x.shape[1]), dtype=F32)))  # fmt: skip
def quantize_act(
    x_MK: torch.Tensor, pow2: bool, rows: torch.Tensor | None = None, row_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _quant.quantize_act(x_MK, pow2, rows=rows, row_scale=row_scale)


@_opaque("quantize_act_t", lambda x, pow2, rows=None, row_scale=None, skip_padding_tiles=False: (x.new_empty(x.shape[1], _rows_of(x, rows), dtype=E4M3), _step_major_scales(x, _rows_of(x, rows))))  # fmt: skip
def quantize_act_t(
    x_MK: torch.Tensor,
    pow2: bool,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    skip_padding_tiles: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _quant.quantize_act_t(x_MK, pow2, rows=rows, row_scale=row_scale, skip_padding_tiles=skip_padding_tiles)


def _quantize_act_both_fake(x, pow2, rows=None, row_scale=None):
    M, K = _rows_of(x, rows), x.shape[1]
    return (x.new_empty(M, K, dtype=E4M3), x.new_empty(M, _blocks(K), dtype=F32),
            x.new_empty(K, M, dtype=E4M3), _step_major_scales(x, M))  # fmt: skip


@_opaque("quantize_act_both", _quantize_act_both_fake)
def quantize_act_both(
    x_MK: torch.Tensor, pow2: bool, rows: torch.Tensor | None = None, row_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quant.quantize_act_both(x_MK, pow2, rows=rows, row_scale=row_scale)


def _weight_scale_fake(w):
    *lead, N, K = w.shape
    return w.new_empty(*lead, _blocks(N), _blocks(K), dtype=F32)


@_opaque("quantize_weight", lambda w, pow2: (w.new_empty(w.shape, dtype=E4M3), _weight_scale_fake(w)))
def quantize_weight(w_NK: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _quant.quantize_weight(w_NK, pow2)


@_opaque("quantize_weight_t", lambda w, pow2: (w.new_empty(w.shape, dtype=E4M3), _weight_scale_fake(w), w.new_empty(w.transpose(-1, -2).shape, dtype=E4M3)))  # fmt: skip
def quantize_weight_t(w_NK: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_fp8, weight_scale_inv, K-major w_fp8 copy) in one pass: quantize_weight(..., transposed=True)."""
    return _quant.quantize_weight(w_NK, pow2, transposed=True)


# ---------------------------------------------------------------------------------------------
# GEMMs


@_opaque("fp8_gemm", lambda x, xs, w, ws, dt: x.new_empty(x.shape[0], w.shape[0], dtype=dt))
def fp8_gemm(
    x_MK: torch.Tensor, x_scale: torch.Tensor, w_NK: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return _fp8_gemm(x_MK, x_scale, w_NK, w_scale, out_dtype)


@_opaque("fp8_gemv", lambda x, w, ws, dt: x.new_empty(x.shape[0], w.shape[0], dtype=dt))
def fp8_gemv(x_MK: torch.Tensor, w_NK: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x W^T for a few rows of unquantised x (decoding): quantised 1x128 inside the GEMM's kernel."""
    return _fp8_gemv(x_MK, w_NK, w_scale, out_dtype)


@_opaque("fp8_gemm_dgrad", lambda dy, dys, w_KN, ws, dt: dy.new_empty(dy.shape[0], w_KN.shape[0], dtype=dt))
def fp8_gemm_dgrad(
    dy_MN: torch.Tensor, dy_scale: torch.Tensor, w_KN: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """dx from dy and the weight's K-major fp8 copy (`quantize_weight_t`)."""
    return _fp8_gemm_dgrad(dy_MN, dy_scale, None, w_scale, out_dtype, w_KN=w_KN)


@_opaque("fp8_gemm_wgrad", lambda dyT, dyTs, xT, xTs, dt: dyT.new_empty(dyT.shape[0], xT.shape[0], dtype=dt))
def fp8_gemm_wgrad(
    dyT_NM: torch.Tensor, dyT_scale: torch.Tensor, xT_KM: torch.Tensor, xT_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return _fp8_gemm_wgrad(dyT_NM, dyT_scale, xT_KM, xT_scale, out_dtype)


@_opaque("fp8_grouped_gemm", lambda x, xs, w, ws, offs, dt: x.new_empty(x.shape[0], w.shape[1], dtype=dt))
def fp8_grouped_gemm(
    x_SK: torch.Tensor, x_scale: torch.Tensor, w_ENK: torch.Tensor, w_scale: torch.Tensor, offs_E: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    return _fp8_grouped_gemm(x_SK, x_scale, w_ENK, w_scale, offs_E, out_dtype)


@_opaque("fp8_grouped_gemm_dgrad", lambda dy, dys, w_EKN, ws, offs, dt: dy.new_empty(dy.shape[0], w_EKN.shape[1], dtype=dt))  # fmt: skip
def fp8_grouped_gemm_dgrad(
    dy_SN: torch.Tensor, dy_scale: torch.Tensor, w_EKN: torch.Tensor, w_scale: torch.Tensor, offs_E: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """dx from dy and the experts' K-major fp8 copy (`quantize_weight_t`)."""
    return _fp8_grouped_gemm_dgrad(dy_SN, dy_scale, None, w_scale, offs_E, out_dtype, w_EKN=w_EKN)


@_opaque("fp8_grouped_gemm_wgrad", lambda dyT, dyTs, xT, xTs, offs, dt, tokens_aligned=False: dyT.new_empty(offs.shape[0], dyT.shape[0], xT.shape[0], dtype=dt))  # fmt: skip
def fp8_grouped_gemm_wgrad(
    dyT_NS: torch.Tensor, dyT_scale: torch.Tensor, xT_KS: torch.Tensor, xT_scale: torch.Tensor, offs_E: torch.Tensor,
    out_dtype: torch.dtype, tokens_aligned: bool = False,
) -> torch.Tensor:  # fmt: skip
    return _fp8_grouped_gemm_wgrad(dyT_NS, dyT_scale, xT_KS, xT_scale, offs_E, out_dtype, tokens_aligned=tokens_aligned)


# ---------------------------------------------------------------------------------------------
# Absorbed MLA from an e4m3 kv_b_proj


@_opaque("mla_absorb_query", lambda q, w, ws, v: q.new_empty(q.shape[0], q.shape[1], w.shape[1]))
def mla_absorb_query(q_nope_THn: torch.Tensor, w_NR: torch.Tensor, w_scale: torch.Tensor, v: int) -> torch.Tensor:
    return _absorb_query(q_nope_THn, w_NR, w_scale, v)


@_opaque("mla_absorb_output", lambda o, w, ws, n, v: o.new_empty(o.shape[0], o.shape[1], v))
def mla_absorb_output(
    o_lat_THR: torch.Tensor, w_NR: torch.Tensor, w_scale: torch.Tensor, n: int, v: int
) -> torch.Tensor:
    return _absorb_output(o_lat_THR, w_NR, w_scale, n, v)
