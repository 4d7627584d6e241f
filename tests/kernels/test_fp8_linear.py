"""FP8Linear, FP8InferenceLinear and the FP8 routed experts: forward and all gradients vs torch
references running the same recipe (same quantisers, bit for bit), and vs full precision."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from modeling_deepseek_v3.kernels import (  # noqa: E402
    FP8InferenceLinear,
    FP8Linear,
    FP8LinearRefFunction,
    experts_forward_ref,
    fp8_experts_forward,
)

# A 1e-7 difference upstream can flip one downstream e4m3 rounding (a 2^-3 relative step) when an
# activation is re-quantised (the experts' second GEMM, and dgrad after SiLU'): rare, so the
# norm-wise error stays near 1e-4; bound 1e-3.
TOL_CHAINED = 1e-3
# Two quantised GEMMs in series, each within the e4m3 recipe bound (0.051): 2x.
TOL_EXPERTS_VS_FP32 = 0.1


def _clone(*ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("shape,N", [((3, 7, 300), 200), ((130, 128), 576), ((1, 256), 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_reference(shape, N, bias, tol, rel):
    torch.manual_seed(sum(shape) + N)
    lin = FP8Linear(shape[-1], N, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    (x2,) = _clone(x)
    (w2,) = _clone(lin.weight)
    b2 = lin.bias.detach().clone().requires_grad_() if bias else None
    y = lin(x)
    y2 = FP8LinearRefFunction.apply(x2, w2)
    y2 = y2 + b2 if bias else y2
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert rel(y, y2) < tol[torch.float32]
    assert rel(x.grad, x2.grad) < tol[torch.float32]
    assert rel(lin.weight.grad, w2.grad) < tol[torch.float32]
    if bias:
        assert rel(lin.bias.grad, b2.grad) < tol[torch.float32]


def test_fp8_linear_vs_fp32_linear(tol, rel):
    torch.manual_seed(0)
    lin = FP8Linear(384, 200, bias=False)
    x = torch.randn(64, 384, requires_grad=True)
    x2, w2 = _clone(x, lin.weight)
    y, y2 = lin(x), F.linear(x2, w2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert rel(y, y2) < tol["e4m3_recipe"]
    assert rel(x.grad, x2.grad) < tol["e4m3_recipe"]
    assert rel(lin.weight.grad, w2.grad) < tol["e4m3_recipe"]


def test_fp8_linear_bf16_master(tol, rel):
    torch.manual_seed(1)
    lin = FP8Linear(256, 200, bias=False, dtype=torch.bfloat16)
    x = torch.randn(16, 256, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.bfloat16
    assert rel(y, F.linear(x.float(), lin.weight.float())) < tol["e4m3_recipe"] + tol[torch.bfloat16]


def test_fp8_linear_under_autocast_hands_on_the_autocast_dtype():
    """accelerate's bf16 mixed precision: fp32 master weight and fp32 input under autocast. Like nn.Linear there,
    FP8Linear computes from the bf16-cast input and returns bf16 (it returned fp32, so an FP8 model under mixed
    precision carried fp32 activations between its layers); the weight's gradient stays fp32 and the input's
    comes back in fp32 through the cast. Stacked layers (forward_shared_input) follow the same rule."""
    torch.manual_seed(2)
    lin, other = FP8Linear(256, 128, bias=False), FP8Linear(256, 72, bias=False)
    x = torch.randn(2, 9, 256, requires_grad=True)
    x_bf16 = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        y_stacked, _ = FP8Linear.forward_shared_input(x, [lin, other])
    w_grad_ref = torch.autograd.grad(lin(x_bf16).float().sum(), lin.weight)[0]
    y_ref = lin(x_bf16)  # outside autocast: the same kernels on the bf16 input
    assert y.dtype == y_stacked.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(y_stacked, y_ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    assert torch.equal(lin.weight.grad, w_grad_ref)


def test_fp8_inference_linear_official_layout(tol, rel):
    torch.manual_seed(2)
    lin = torch.nn.Linear(300, 576, bias=False)
    fp8 = FP8InferenceLinear.from_linear(lin)
    sd = fp8.state_dict()
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (576, 300)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (5, 3)  # ragged 576 rows
    x = torch.randn(2, 5, 300)
    y = fp8(x)
    # vs the dequantised weight in full precision: only x's e4m3 rounding remains (one operand).
    assert rel(y, F.linear(x, fp8.dequantized_weight(torch.float32))) < tol["e4m3_recipe"]
    assert not any(p.dtype in (torch.bfloat16, torch.float32) and p.numel() == 576 * 300 for p in fp8.parameters())


def _experts_case(seed, T=9, Kt=2, E=5, D=256, I=64):  # noqa: E741  (I: expert intermediate size, as in the paper)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:Kt] for _ in range(T)])  # expert E-1 gets no token
    wt = torch.rand(T, Kt, generator=g)
    gu = torch.randn(E, 2 * I, D, generator=g) * 0.05
    dn = torch.randn(E, D, I, generator=g) * 0.05
    return h.requires_grad_(), idx, wt, gu.requires_grad_(), dn.requires_grad_()


def test_fp8_experts_matches_reference(tol, rel):
    h, idx, wt, gu, dn = _experts_case(0)
    h2, gu2, dn2 = _clone(h, gu, dn)
    y = fp8_experts_forward(h, idx, wt, gu, dn)
    y2 = experts_forward_ref(h2, idx, wt, gu2, dn2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert rel(y, y2) < tol[torch.float32]
    assert rel(gu.grad, gu2.grad) < tol[torch.float32]
    assert rel(dn.grad, dn2.grad) < tol[torch.float32]
    assert rel(h.grad, h2.grad) < TOL_CHAINED
    assert torch.equal(gu.grad[-1], torch.zeros_like(gu.grad[-1])) and torch.equal(
        dn.grad[-1], torch.zeros_like(dn.grad[-1])
    )


def test_fp8_experts_with_the_topk_sum_kernel(monkeypatch, rel):
    """fp8_experts_forward in eager mode with topk_sum.SUM_SLOTS_KERNEL on (the default on a GPU: its combine and its
    gather's gradient through the kernel) against the same with index_add: equal up to the fp32 sum's order, output
    and every gradient. The model takes the kernels on CUDA tensors only (modeling_dsv3._eager_kernels); here they
    are forced onto the CPU's interpreter."""
    from modeling_deepseek_v3.kernels import topk_sum

    from modeling_deepseek_v3 import modeling_dsv3 as M

    monkeypatch.setattr(M, "_eager_kernels", lambda device, module: topk_sum if module == "topk_sum" else None)

    h, idx, wt, gu, dn = _experts_case(5, T=21, Kt=3, E=6, D=256, I=128)
    h, wt, gu, dn = (t.detach().to(torch.bfloat16).requires_grad_() for t in (h, wt, gu, dn))
    h2, wt2, gu2, dn2 = _clone(h, wt, gu, dn)
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    monkeypatch.setattr(topk_sum, "SUM_SLOTS_KERNEL", False)
    y = fp8_experts_forward(h, idx, wt, gu, dn)
    y.backward(g)
    monkeypatch.setattr(topk_sum, "SUM_SLOTS_KERNEL", True)
    calls = []
    real = topk_sum.sum_slots
    monkeypatch.setattr(topk_sum, "sum_slots", lambda *a: calls.append(1) or real(*a))
    y2 = fp8_experts_forward(h2, idx, wt2, gu2, dn2)
    y2.backward(g)
    assert len(calls) == 2, "the combine and the gather's gradient"
    # Bound: one bf16 ulp (2^-8 relative) on an element whose fp32 sum rounds the other way in the other order (on
    # the CPU index_add happens to add in slot order too; measured: identical).
    assert rel(y2, y) < 4e-3
    for a, b in ((h, h2), (wt, wt2), (gu, gu2), (dn, dn2)):
        assert a.grad.abs().sum() > 0 and rel(b.grad, a.grad) < 4e-3


def _gathered_vs_written_out(device, seed=2, T=37, Kt=3, E=6, D=256, I=128):  # noqa: E741
    """fp8_experts_forward, and the same recipe with the routed rows and their gradient written out in bf16 and
    autograd doing the gather and the combine (as before the quantisers gathered them): [(name, ours, theirs)] for
    the output and every gradient. The routing weights' gradient is the exception: ours sums fp32 products (the
    combine's backward, topk_sum.slot_dots), autograd's the products rounded to bf16, so "wt" comes as (ours,
    (exact in fp64, its bound)) for _agrees."""
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    from modeling_deepseek_v3 import modeling_dsv3 as M

    h, idx, wt, gu, dn = _experts_case(seed, T=T, Kt=Kt, E=E, D=D, I=I)
    h, wt, gu, dn = (t.detach().to(device, torch.bfloat16).requires_grad_() for t in (h, wt, gu, dn))
    idx = idx.to(device)
    h2, wt2, gu2, dn2 = _clone(h, wt, gu, dn)
    y = fp8_experts_forward(h, idx, wt, gu, dn)

    order_S, token_S, row_TK, offs_E = FL._sort_by_expert(idx, gu2.shape[0])
    padded = FL.pad_experts_to_tiles(offs_E, token_S.shape[0])  # the wgrad's layout, as fp8_experts_forward's
    x_SD = h2.detach()[token_S].requires_grad_()  # written out; its gradient summed per token below
    h_SF = FL.FP8GroupedLinearFunction.apply(x_SD, gu2, offs_E, False, None, True, None, None, padded)
    # (SwiGLU and the 1x128 quantisations apart: fp8_experts_forward fuses them where I is a multiple of 128,
    # FUSE_SWIGLU_QUANT, and must give the same bits)
    y_SD = FL.FP8GroupedLinearFunction.apply(FL._gated(h_SF, F.silu), dn2, offs_E, False, None, True, None, None,
                                             padded)  # fmt: skip
    y2 = M._sum_slots(y_SD, (order_S, token_S, row_TK), wt2)  # autograd differentiates the combine

    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    y.backward(g)
    y2.backward(g)
    h2.grad = M._sum_slots(x_SD.grad, (order_S, token_S, row_TK))
    assert wt2.grad.abs().sum() > 0  # autograd's, to show the routing weights' gradient flows in the reference too
    products = g.double()[:, None, :] * y_SD.detach().double()[row_TK]  # [T, Kt, D]
    exact = products.sum(-1)
    # One bf16 rounding of the result (half an ulp: 2^-8 relative at most) over an fp32 sum of exact products
    # (bf16 x bf16 fits fp32), whose error is at most D * 2^-24 of the sum of their magnitudes.
    bound = 2**-8 * exact.abs() + D * 2**-24 * products.abs().sum(-1)
    return [("y", y, y2), ("wt", wt.grad, (exact, bound))] + [
        (n, a.grad, b.grad) for n, a, b in (("h", h, h2), ("gu", gu, gu2), ("dn", dn, dn2))
    ]


def _agrees(name, ours, theirs) -> bool:
    """ours equals theirs bit for bit, or for the routing weights lies within the bound of the exact value."""
    if name != "wt":
        return torch.equal(ours, theirs)
    exact, bound = theirs
    return bool(((ours.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("counts", [[0, 1, 128, 129, 0, 300], [256], [5, 0, 0], [127, 127, 127], [0, 0]])
def test_pad_experts_to_tiles(counts):
    """The wgrad's padded layout: each expert's rows in order from a multiple of 128, then -1 to the next tile; an
    empty expert takes no position; everything from offs_P[-1] to the static bound is padding."""
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    offs_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    S, E = sum(counts), len(counts)
    row_P, offs_P = FL.pad_experts_to_tiles(offs_E, S)
    padded = [-(-c // 128) * 128 for c in counts]
    assert offs_P.dtype == torch.int32 and offs_P.tolist() == torch.tensor(padded).cumsum(0).tolist()
    assert row_P.shape[0] == (S + min(E, S) * 127) // 128 * 128 >= offs_P[-1]
    expected, start = [], 0
    for c, p in zip(counts, padded, strict=True):
        expected += list(range(start, start + c)) + [-1] * (p - c)
        start += c
    expected += [-1] * (row_P.shape[0] - len(expected))
    assert row_P.tolist() == expected


@pytest.mark.parametrize("padded", [False, True])
def test_fp8_grouped_linear_padded_wgrad_matches_reference(padded, tol, rel):
    """FP8GroupedLinearFunction with and without the padded wgrad layout against the reference tiled the same way
    (expert_tiles); the two tilings' weight gradients differ (so the check can tell them apart), by rounding only."""
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    g = torch.Generator().manual_seed(11)
    counts = [70, 0, 200, 130]
    offs_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 256, generator=g).requires_grad_()
    w = (torch.randn(4, 192, 256, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(sum(counts), 192, generator=g)
    layout = FL.pad_experts_to_tiles(offs_E, sum(counts)) if padded else None
    FL.FP8GroupedLinearFunction.apply(x, w, offs_E, False, None, True, None, None, layout).backward(dy)
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    FL.FP8GroupedLinearRefFunction.apply(x2, w2, offs_E, False, padded).backward(dy)
    assert rel(w.grad, w2.grad) < tol[torch.float32] and rel(x.grad, x2.grad) < tol[torch.float32]
    x3, w3 = (t.detach().clone().requires_grad_() for t in (x, w))
    FL.FP8GroupedLinearRefFunction.apply(x3, w3, offs_E, False, not padded).backward(dy)
    assert 1e-4 < rel(w.grad, w3.grad) < 0.1, "the other tiling gives another (close) weight gradient"


def test_fp8_experts_gathered_rows_equal_the_rows_written_out():
    """fp8_experts_forward never writes the routed rows x[token] nor their gradient dout[token] * weight in bf16: the
    quantisers gather them. Against the same recipe with both written out, in bf16: output and every gradient bit for
    bit, the routing weights' within the bound of their exact value (_gathered_vs_written_out says why; the GPU twin
    below runs it at a model's size)."""
    for name, ours, theirs in _gathered_vs_written_out("cpu"):
        assert ours.abs().sum() > 0 and _agrees(name, ours, theirs), name


_GATHER_GPU_CHECK = """
import torch
from test_fp8_linear import _agrees, _gathered_vs_written_out

# deepseek-v3-small's routed experts at 4096 tokens: 24576 rows, some experts straddling 128-row tiles
diff = [name for name, a, b in _gathered_vs_written_out("cuda", T=4096, Kt=6, E=64, D=1024, I=512)
        if not (a.abs().sum() > 0 and _agrees(name, a, b))]
assert not diff, diff
print("ok")
"""


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a CUDA GPU with TMA (compute capability 9.0); the interpreter test above covers the logic",
)
def test_fp8_experts_gathered_rows_on_the_gpu(without_interpreter):
    """The test above with the GPU kernels (Gluon's transposed quantiser included), in a subprocess: this process
    imported the kernels under TRITON_INTERPRET=1."""
    without_interpreter(_GATHER_GPU_CHECK)  # this folder is on its path


_LINEAR_GPU_CHECK = """
import importlib
import torch
from modeling_deepseek_v3.kernels import FP8Linear, FP8LinearRefFunction

GL = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemm_gluon")
launches = []
real = GL.launch_gluon
GL.launch_gluon = lambda *a, **k: launches.append((a[4], k.get("config"))) or real(*a, **k)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
torch.manual_seed(0)
# 4096 tokens: forward and dgrad on the Gluon kernel (M >= GLUON_MIN_M), the wgrad's dW of 32 x 16 tiles on its
# SCALES_TMA configuration; fp32 master weights, and a bf16 model. The reference runs on the CPU: on CUDA torch
# divides by a Python scalar as a multiply by its reciprocal, so its scales (amax / 448) are off by an ulp in some
# tiles, which moves bf16 inputs' exact e4m3 ties (0.47% on dW, measured on the H200) where the kernels round as the
# CPU does. Tolerances: fp32, Hopper's e4m3 wgmma accumulates a 128-K step at about 2^-13 (1.27e-4 measured against
# the exact product of the same codes); bf16, plus half a bf16 ulp (2^-9) on each output (6.9e-4 measured).
for dtype, tol in ((torch.float32, 5e-4), (torch.bfloat16, 4e-3)):
    lin = FP8Linear(2048, 4096, bias=False, device="cuda", dtype=dtype)
    x = torch.randn(2, 2048, 2048, device="cuda", dtype=dtype, requires_grad=True)
    x2, w2 = x.detach().cpu().requires_grad_(), lin.weight.detach().cpu().requires_grad_()
    g = torch.randn(2, 2048, 4096, device="cuda", dtype=dtype)
    launches.clear()
    lin(x).backward(g)
    assert (False, GL.WGRAD_DEFAULT_CONFIG) in launches and sum(b for b, _ in launches) == 2, launches
    FP8LinearRefFunction.apply(x2, w2).backward(g.cpu())
    for name, a, b in (("dx", x.grad, x2.grad), ("dW", lin.weight.grad, w2.grad)):
        assert a.abs().sum() > 0 and rel(a.cpu(), b) < tol, (dtype, name, rel(a.cpu(), b))
print("ok")
"""


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an H100/H200 (the Gluon kernels); the interpreter tests above cover the recipe",
)
def test_fp8_linear_on_the_gpu(without_interpreter):
    """FP8Linear forward+backward where all three GEMMs take the Gluon kernel (the wgrad on its SCALES_TMA
    configuration), against the torch reference of the same recipe, fp32 and bf16, in a subprocess (this process
    imported the kernels under TRITON_INTERPRET=1)."""
    without_interpreter(_LINEAR_GPU_CHECK)


def test_fp8_experts_route_without_bincount(monkeypatch):
    """No host sync in the FP8 experts' routing: CUDA's torch.bincount reads max(idx) back to the host to size its
    output, which would stall every MoE layer's launches. Forward and backward run with it unavailable, and the
    row offsets equal bincount's."""
    from modeling_deepseek_v3.kernels import fp8_linear

    h, idx, wt, gu, dn = _experts_case(0)
    expected = torch.bincount(idx.reshape(-1), minlength=gu.shape[0]).cumsum(0).to(torch.int32)

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount syncs with the host on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    assert torch.equal(fp8_linear._sort_by_expert(idx, gu.shape[0])[3], expected)
    fp8_experts_forward(h, idx, wt, gu, dn).sum().backward()
    assert gu.grad is not None and h.grad is not None


def test_fp8_experts_vs_full_precision(rel):
    h, idx, wt, gu, dn = _experts_case(1)
    y = fp8_experts_forward(h, idx, wt, gu, dn)
    y_hp = experts_forward_ref(h.detach(), idx, wt, gu.detach(), dn.detach(), fp8=False)
    assert rel(y, y_hp) < TOL_EXPERTS_VS_FP32


def test_forward_only_calls_skip_the_backward_copies(monkeypatch):
    """Under torch.no_grad ctx.needs_input_grad still reports the weight's requires_grad: FP8Linear and the FP8
    experts must then quantise x in the 1x128 tiling only and the weight without its K-major copy, and give the
    same output as with gradients enabled."""
    from modeling_deepseek_v3.kernels import fp8_linear

    calls = []
    for name in ("quantize_act_both", "quantize_weight", "quantize_weight_t"):  # quantize_weight_t: + K-major copy
        real = getattr(fp8_linear, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(fp8_linear, name, spy)
    torch.manual_seed(0)
    layer = FP8Linear(256, 130, bias=False)
    x = torch.randn(5, 256)
    h, idx, wt, gu, dn = _experts_case(0)
    with torch.no_grad():
        y_nograd = layer(x)
        e_nograd = fp8_experts_forward(h, idx, wt, gu, dn)
    assert calls and all(name == "quantize_weight" for name in calls), calls
    calls.clear()
    y, e = layer(x), fp8_experts_forward(h, idx, wt, gu, dn)
    assert "quantize_act_both" in calls and "quantize_weight_t" in calls  # training path unchanged
    assert torch.equal(y, y_nograd) and torch.equal(e, e_nograd)


def test_shared_input_layers_run_as_one_gemm(monkeypatch, tol, rel):
    """FP8Linear.forward_shared_input: layers reading one x (MLA's q_a / kv_a, an MLP's gate / up) as one FP8 GEMM
    on the stacked weights, x quantised once, matching the layers run apart (outputs and every gradient); where
    stacking would regroup the 128x128 weight blocks (a width before the last not a multiple of 128) or a layer
    has a bias, the layers run apart, bit for bit as before."""
    from modeling_deepseek_v3.kernels import fp8_linear

    quantised = []
    real = fp8_linear.quantize_act_both
    monkeypatch.setattr(fp8_linear, "quantize_act_both", lambda *a, **k: quantised.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(3, 70, 256)
    layers = [FP8Linear(256, 256, bias=False), FP8Linear(256, 136, bias=False)]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = FP8Linear.forward_shared_input(x1, layers)
    assert len(quantised) == 1, "x is quantised once for both layers"
    g = [torch.randn_like(y) for y in fused]
    torch.autograd.backward(fused, g)
    fused_grads = [layer.weight.grad.clone() for layer in layers]
    for layer in layers:
        layer.weight.grad = None
    apart = [layer(x2) for layer in layers]
    torch.autograd.backward(apart, g)
    for yf, ya, gf, layer in zip(fused, apart, fused_grads, layers, strict=True):
        assert yf.shape == ya.shape and rel(yf, ya) < tol[torch.float32]
        assert rel(gf, layer.weight.grad) < tol[torch.float32]
    assert rel(x1.grad, x2.grad) < TOL_CHAINED  # dgrad summed in fp32 before the output rounding, apart after
    with torch.no_grad():
        for stack in ([FP8Linear(256, 136, bias=False), FP8Linear(256, 256, bias=False)],
                      [FP8Linear(256, 256, bias=True), FP8Linear(256, 128, bias=False)]):  # fmt: skip
            quantised.clear()
            out = FP8Linear.forward_shared_input(x, stack)
            assert all(torch.equal(a, layer(x)) for a, layer in zip(out, stack, strict=True))
            assert len(quantised) == 0  # apart: each layer quantises x itself, in the 1x128 tiling only (no grad)
