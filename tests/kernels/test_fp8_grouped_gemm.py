"""Grouped FP8 GEMMs for MoE experts vs a loop over experts, same pre-quantised operands.

Token counts include experts with zero tokens (first, middle and last) and experts whose rows
straddle the 128-token scale tiles of the wgrad operands.
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import (  # noqa: E402
    fp8_grouped_gemm,
    fp8_grouped_gemm_dgrad,
    fp8_grouped_gemm_dgrad_ref,
    fp8_grouped_gemm_ref,
    fp8_grouped_gemm_wgrad,
    fp8_grouped_gemm_wgrad_ref,
    quantize_act_ref,
    quantize_act_t_ref,
    quantize_weight_ref,
)

COUNTS = [[0, 5, 0, 131, 1, 0], [40], [0, 0, 7]]  # tokens per expert


def _case(counts, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    S, E = sum(counts), len(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(S, K, generator=g)
    w = torch.randn(E, N, K, generator=g) * 0.1
    dy = torch.randn(S, N, generator=g)
    return offs, x, w, dy


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("N,K", [(200, 300), (64, 128)])
def test_grouped_forward_and_dgrad(counts, N, K, tol, rel):
    offs, x, w, dy = _case(counts, N, K, seed=len(counts) + N)
    xq, xs = quantize_act_ref(x)
    wq, ws = quantize_weight_ref(w)
    y = fp8_grouped_gemm(xq, xs, wq, ws, offs, torch.float32)
    assert y.shape == (x.shape[0], N)
    assert rel(y, fp8_grouped_gemm_ref(xq, xs, wq, ws, offs, torch.float32)) < tol[torch.float32]
    dyq, dys = quantize_act_ref(dy)
    dx = fp8_grouped_gemm_dgrad(dyq, dys, wq, ws, offs, torch.float32)
    assert rel(dx, fp8_grouped_gemm_dgrad_ref(dyq, dys, wq, ws, offs, torch.float32)) < tol[torch.float32]


def test_grouped_tma_path_ragged_n(tol, rel):
    """The TMA grouped kernels: forward with N not a multiple of its tile (reads into the next expert's
    weight rows, which must not reach the output), dgrad from the pre-transposed weight copy, and the
    persistent wgrad (experts straddling 128-token scale tiles, an expert with no tokens)."""
    import importlib

    GG = importlib.import_module("modeling_deepseek_v3.kernels.fp8_grouped_gemm")
    counts = [3, 0, 130, 27]  # S = 160: 16-byte token rows for the wgrad's TMA; expert 2 straddles a 128-token tile
    offs, x, w, dy = _case(counts, 80, 144, seed=3)
    xq, xs = quantize_act_ref(x)
    wq, ws = quantize_weight_ref(w)
    y = GG._grouped_launch(xq, xs, wq, ws, offs, torch.float32, use_tma=True)
    assert rel(y, fp8_grouped_gemm_ref(xq, xs, wq, ws, offs, torch.float32)) < tol[torch.float32]
    dyq, dys = quantize_act_ref(dy)
    wqt = wq.transpose(1, 2).contiguous()
    dx = fp8_grouped_gemm_dgrad(dyq, dys, None, ws, offs, torch.float32, w_EKN=wqt)
    assert rel(dx, fp8_grouped_gemm_dgrad_ref(dyq, dys, wq, ws, offs, torch.float32)) < tol[torch.float32]
    dyTq, dyTs = quantize_act_t_ref(dy)
    xTq, xTs = quantize_act_t_ref(x)
    dw = fp8_grouped_gemm_wgrad(dyTq, dyTs, xTq, xTs, offs, use_tma=True)
    assert rel(dw, fp8_grouped_gemm_wgrad_ref(dyTq, dyTs, xTq, xTs, offs)) < tol[torch.float32]
    assert torch.equal(dw[1], torch.zeros(80, 144)), "an expert with no tokens has a zero gradient"


@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_wgrad(counts, tol, rel):
    N, K = 200, 300
    offs, x, w, dy = _case(counts, N, K, seed=len(counts))
    dyTq, dyTs = quantize_act_t_ref(dy)
    xTq, xTs = quantize_act_t_ref(x)
    dw = fp8_grouped_gemm_wgrad(dyTq, dyTs, xTq, xTs, offs)
    ref = fp8_grouped_gemm_wgrad_ref(dyTq, dyTs, xTq, xTs, offs)
    assert dw.shape == (len(counts), N, K)
    assert rel(dw, ref) < tol[torch.float32]
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(dw[e], torch.zeros(N, K)), "an expert with no tokens has a zero gradient"
