"""Absorbed MLA's two products with kv_b_proj straight from an FP8 checkpoint's e4m3 weight, with torch references.

kv_b_proj.weight [H * (n + v), R] holds, per head h, W_UK[h] (rows h (n + v) .. + n: the latent to the head's keys)
and W_UV[h] (the next v rows: the latent to its values). Absorbed decoding multiplies the query into the first and
the attention output out of the second (modeling_dsv3.DSV3Attention._absorbed):

    q_lat[t, h, :] = q_nope[t, h, :] . W_UK[h]        [T, H, n] -> [T, H, R]
    out[t, h, :]   = o_lat[t, h, :] . W_UV[h]^T       [T, H, R] -> [T, H, v]

With the weight in e4m3 (FP8InferenceLinear), DeepSeek's inference code dequantises the whole matrix every step
and runs the products in bf16 (as this package did before these kernels): at V3's [32768, 512], 16.8 MB read and
33.5 MB written a layer a step, then 33.5 MB read again by the products. These kernels read the e4m3 tiles and their 128x128 scales and
dequantise in registers, as dequantize_weight would (w * scale, rounded to the activations' dtype), so they compute
the same products as the dequantise-then-einsum path up to the fp32 summation order, from 16.8 MB.

Shape legend: T tokens, H heads, n qk_nope_head_dim, v v_head_dim, R kv_lora_rank.
"""

from __future__ import annotations

import torch

from . import _triton as tt
from .mla_decode import dot_modes
from .quant import BLOCK, dequantize_weight_ref

triton, tl = tt.triton, tt.tl


# Tiles of W a program: the query kernel's latent columns; the output kernel's (value rows, latent columns a step).
# Chosen to fit the registers without spills for sm_90a at V3's heads (the dequantised tile is held in fp32 before
# its rounding; [128, 128] spilled). On an H200 a V3 layer's two products run 1.5x as fast as dequantising the
# matrix (Triton) and two einsums (RESULTS.md, session 20). Column tiles must divide 128 (one scale a row).
QUERY_TILE_R = 64
OUTPUT_TILE = (64, 32)


def _tile(n: int) -> int:
    """A tensor-core tile dim covering n: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


if tt.HAS_TRITON:
    from .mla_decode import _mla_dot, _mla_dot_t
    from .quant import _round_mult

    @triton.jit
    def _dequantized_tile(w_ptr, ws_ptr, rows, col0, COLS: tl.constexpr, row_ok, R, DTYPE: tl.constexpr,
                          EXACT: tl.constexpr):  # fmt: skip
        """W[rows, col0 : col0 + COLS] as DTYPE: e4m3 times its block's scale, rounded once to nearest even, as
        dequantize_weight's element (EXACT: by integer arithmetic, where the interpreter's cast would truncate). The
        columns lie in one 128-column block (the callers' tiles divide 128): one scale a row."""
        offs_c = col0 + tl.arange(0, COLS)
        mask = row_ok[:, None] & (offs_c < R)[None, :]
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * R + offs_c[None, :], mask=mask, other=0.0)
        s = tl.load(ws_ptr + (rows // 128) * tl.cdiv(R, 128) + col0 // 128, mask=row_ok, other=0.0)
        return _round_mult(w.to(tl.float32) * s[:, None], DTYPE, EXACT).to(DTYPE)

    @triton.jit
    def _absorb_query_kernel(
        q_ptr, w_ptr, ws_ptr, out_ptr, T, H, R, n, head_rows, stride_qt, stride_qh,
        BLOCK_T: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # One program: q_lat[BLOCK_T tokens, head h, BLOCK_R latent columns]; out [T, H, R] contiguous.
        h = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_i = tl.arange(0, NP)
        t_ok, i_ok = offs_t < T, offs_i < n
        q = tl.load(q_ptr + offs_t[:, None] * stride_qt + h * stride_qh + offs_i[None, :],
                    mask=t_ok[:, None] & i_ok[None, :], other=0.0)  # fmt: skip
        w = _dequantized_tile(w_ptr, ws_ptr, h * head_rows + offs_i, tl.program_id(1) * BLOCK_R, BLOCK_R, i_ok, R,
                              q_ptr.dtype.element_ty, UPCAST)  # fmt: skip
        acc = _mla_dot(q, w, UPCAST, IEEE)  # [BLOCK_T, BLOCK_R]
        out = out_ptr + (offs_t[:, None] * H + h) * R + offs_r[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _absorb_output_kernel(
        o_ptr, w_ptr, ws_ptr, out_ptr, T, H, R, n, v, head_rows, stride_ot, stride_oh,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # One program: out[BLOCK_T tokens, head h, BLOCK_V value columns], a loop over R; out [T, H, v] contiguous.
        h = tl.program_id(0)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok, v_ok = offs_t < T, offs_v < v
        rows = h * head_rows + n + offs_v
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_K):
            offs_k = r0 + tl.arange(0, BLOCK_K)
            o = tl.load(o_ptr + offs_t[:, None] * stride_ot + h * stride_oh + offs_k[None, :],
                        mask=t_ok[:, None] & (offs_k < R)[None, :], other=0.0)  # fmt: skip
            w = _dequantized_tile(w_ptr, ws_ptr, rows, r0, BLOCK_K, v_ok, R, o_ptr.dtype.element_ty, UPCAST)
            acc = _mla_dot_t(o, w, acc, UPCAST, IEEE)  # + o . w^T, w [BLOCK_V, BLOCK_K]
        out = out_ptr + (offs_t[:, None] * H + h) * v + offs_v[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & v_ok[None, :])


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, n: int, v: int, width: int, name: str) -> None:
    tt.require_fp8("mla_absorb")
    assert x.dim() == 3 and x.stride(-1) == 1, f"{name} must be [T, H, {width}] with unit last stride"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"{name} must be a float tensor, got {x.dtype}"
    T, H, X = x.shape
    assert X == width, f"{name}'s last dim must be {width}, got {X}"
    assert w.dtype == torch.float8_e4m3fn and w.dim() == 2 and w.is_contiguous(), "W must be contiguous e4m3 [rows, R]"
    assert w.shape[0] == H * (n + v), f"W must have H * (n + v) = {H * (n + v)} rows, got {w.shape[0]}"
    want = (triton.cdiv(w.shape[0], BLOCK), triton.cdiv(w.shape[1], BLOCK))
    assert tuple(w_scale.shape) == want, f"W scales must be {list(want)}, got {list(w_scale.shape)}"
    assert x.device == w.device == w_scale.device, "activations, W and its scales must be on one device"


def _block_t(T: int) -> int:
    return 16 if T <= 16 else 64


def absorb_query(q_nope_THn: torch.Tensor, w_NR: torch.Tensor, w_scale: torch.Tensor, v: int) -> torch.Tensor:
    """q_lat [T, H, R] = q_nope . W_UK per head, W = kv_b_proj's e4m3 weight [H * (n + v), R] with its 128x128
    weight_scale_inv; q_nope may be a strided view (unit last stride), n its last dim."""
    T, H, n = q_nope_THn.shape
    R = w_NR.shape[1]
    _check(q_nope_THn, w_NR, w_scale, n, v, n, "q_nope")
    out = torch.empty(T, H, R, dtype=q_nope_THn.dtype, device=q_nope_THn.device)
    if out.numel() == 0:
        return out
    bt, br = _block_t(T), min(QUERY_TILE_R, _tile(R))  # br divides 128: a column tile lies in one scale block
    grid = (H, triton.cdiv(R, br), triton.cdiv(T, bt))
    _absorb_query_kernel[grid](
        q_nope_THn, w_NR, w_scale.float().contiguous(), out, T, H, R, n, n + v, q_nope_THn.stride(0),
        q_nope_THn.stride(1), BLOCK_T=bt, NP=_tile(n), BLOCK_R=br, **dot_modes(q_nope_THn.dtype),
    )  # fmt: skip
    return out


def absorb_output(o_lat_THR: torch.Tensor, w_NR: torch.Tensor, w_scale: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """out [T, H, v] = o_lat . W_UV^T per head (see absorb_query); o_lat may be a strided view (unit last stride)."""
    T, H, R = o_lat_THR.shape
    _check(o_lat_THR, w_NR, w_scale, n, v, w_NR.shape[1], "o_lat")
    out = torch.empty(T, H, v, dtype=o_lat_THR.dtype, device=o_lat_THR.device)
    if out.numel() == 0:
        return out
    bt, bv, bk = _block_t(T), min(OUTPUT_TILE[0], _tile(v)), min(OUTPUT_TILE[1], _tile(R))
    _absorb_output_kernel[(H, triton.cdiv(v, bv), triton.cdiv(T, bt))](
        o_lat_THR, w_NR, w_scale.float().contiguous(), out, T, H, R, n, v, n + v, o_lat_THR.stride(0),
        o_lat_THR.stride(1), BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=bk, **dot_modes(o_lat_THR.dtype),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Torch references: dequantise the whole matrix, then the products (the path the kernels replace)


def _heads_ref(w_NR: torch.Tensor, w_scale: torch.Tensor, H: int, n: int, v: int, dtype: torch.dtype):
    w = dequantize_weight_ref(w_NR, w_scale, dtype).view(H, n + v, w_NR.shape[1])
    return w.split([n, v], dim=1)  # W_UK [H, n, R], W_UV [H, v, R]


def absorb_query_ref(q_nope_THn, w_NR, w_scale, v):
    T, H, n = q_nope_THn.shape
    w_uk, _ = _heads_ref(w_NR, w_scale, H, n, v, q_nope_THn.dtype)
    return torch.einsum("thn,hnr->thr", q_nope_THn, w_uk)


def absorb_output_ref(o_lat_THR, w_NR, w_scale, n, v):
    _, w_uv = _heads_ref(w_NR, w_scale, o_lat_THR.shape[1], n, v, o_lat_THR.dtype)
    return torch.einsum("thr,hvr->thv", o_lat_THR, w_uv)
