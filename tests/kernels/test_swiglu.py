"""kernels/swiglu.py: silu(gate) * up and its backward as one kernel each, against torch's eager ops (F.silu, the
product, autograd), and its use in the FP8 experts."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from modeling_deepseek_v3.kernels import swiglu as SW  # noqa: E402


# Elementwise bounds against torch. The kernels compute torch's formulas in fp32 and round where torch rounds, so
# only exp (and on the GPU the fp32 division) differs: numpy's in the interpreter, and on the GPU Triton's
# 2^(x log2 e), whose rounded argument costs |x| 2^-24 relative, against CUDA's expf. In fp32 that is a few ulps
# plus |gate| 2^-24 (bounded by 2^-22 (8 + |gate|)); in bf16 it moves a result by at most one ulp (2^-7 relative:
# the half-ulp rounding on either side of a tie). The silu derivative 1 + g (1 - sigmoid(g)) cancels near
# g = -1.28, so its absolute fp32 error, |g| times sigmoid's (2^-21 generously), enters dgate unscaled.
def _rel_bound(gate, dtype):
    return 2**-7 if dtype == torch.bfloat16 else 2**-22 * (8 + gate.abs())


def _torch_swiglu(h, da):
    h = h.detach().clone().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    a.backward(da)
    return a.detach(), h.grad


def _check_swiglu(S, I, dtype, device="cpu"):  # noqa: E741
    """Rows and columns ragged against the 8 x 256 tile; gates from -40 to 40 (exp over- and underflows), a tenth of
    them exactly zero."""
    g = torch.Generator().manual_seed(S * 1000 + I)
    h = torch.randn(S, 2 * I, generator=g) * 3
    h[:, :I] = h[:, :I] * torch.linspace(0.1, 13, I)
    h[torch.rand(S, 2 * I, generator=g) < 0.1] = 0.0
    h = h.to(device, dtype)
    da = torch.randn(S, I, generator=g).to(device, dtype)
    a_ref, dh_ref = _torch_swiglu(h, da)
    x = h.detach().clone().requires_grad_()
    a = SW.swiglu(x)
    a.backward(da)
    assert a.dtype == dtype and a.shape == (S, I) and x.grad.shape == (S, 2 * I)
    gate, up = h.double().chunk(2, dim=-1)
    ulp = _rel_bound(gate, dtype)
    d_silu = (da.double() * up).abs()
    assert ((a.double() - a_ref.double()).abs() <= ulp * a_ref.double().abs()).all()
    d_gate, d_up = x.grad.double().chunk(2, dim=-1)
    d_gate_ref, d_up_ref = dh_ref.double().chunk(2, dim=-1)
    assert ((d_up - d_up_ref).abs() <= ulp * d_up_ref.abs()).all()
    assert ((d_gate - d_gate_ref).abs() <= ulp * d_gate_ref.abs() + 2**-21 * d_silu * (1 + gate.abs())).all()
    if dtype == torch.bfloat16:
        # The rounding order is torch's: bit-equal almost everywhere (measured: everywhere in these cases), where
        # skipping the rounding of silu(gate) before the product alone would change a few percent of the outputs.
        for ours, theirs in ((a, a_ref), (x.grad, dh_ref)):
            assert (ours == theirs).float().mean() > 0.999
        unrounded = (F.silu(gate.float()) * up.float()).to(dtype)
        assert (unrounded != a_ref).float().mean() > 0.005


CASES = [(37, 300), (1, 7), (9, 256), (130, 64)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's, in the interpreter: exp(40) in fp32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S, I", CASES)  # noqa: E741
def test_swiglu_matches_torch(S, I, dtype):  # noqa: E741
    _check_swiglu(S, I, dtype)


def _check_quantized(S, I, pow2, device="cpu"):  # noqa: E741
    """swiglu_forward / swiglu_backward with pow2 given: a and dh as without it, and their 1x128 tilings equal to
    quant.quantize_act's of them, codes and scales bit for bit (a's last block ragged where I % 128 != 0)."""
    from modeling_deepseek_v3.kernels import quantize_act

    g = torch.Generator().manual_seed(S + I + pow2)
    h = (torch.randn(S, 2 * I, generator=g) * torch.logspace(-2, 1, 2 * I)).to(device, torch.bfloat16)
    da = torch.randn(S, I, generator=g).to(device, torch.bfloat16)
    a, a_q, a_s = SW.swiglu_forward(h, pow2)
    a_plain = SW.swiglu_forward(h)
    assert a_plain[1] is None and torch.equal(a, a_plain[0])
    pairs = list(zip((a_q, a_s), quantize_act(a, pow2), strict=True))
    if SW.quantizes(I):
        dh, dh_q, dh_s = SW.swiglu_backward(h, da, pow2)
        assert torch.equal(dh, SW.swiglu_backward(h, da)[0])
        pairs += list(zip((dh_q, dh_s), quantize_act(dh, pow2), strict=True))
    else:
        with pytest.raises(AssertionError, match="straddle"):
            SW.swiglu_backward(h, da, pow2)
    for ours, theirs in pairs:
        assert torch.equal(ours.view(torch.uint8) if ours.dtype == torch.float8_e4m3fn else ours,
                           theirs.view(torch.uint8) if theirs.dtype == torch.float8_e4m3fn else theirs)  # fmt: skip


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("S, I", [(37, 256), (5, 300), (18, 128)])  # noqa: E741
def test_swiglu_quantizes_its_output_as_quantize_act(S, I, pow2):  # noqa: E741
    _check_quantized(S, I, pow2)


_GPU_CHECK = """
import torch
from test_swiglu import CASES, _check_quantized, _check_swiglu

for S, I in CASES + [(65536, 2048)]:  # and the V3 layer's routed rows
    for dtype in (torch.bfloat16, torch.float32):
        _check_swiglu(S, I, dtype, "cuda")
for S, I in [(37, 256), (5, 300), (65536, 2048)]:
    for pow2 in (False, True):
        _check_quantized(S, I, pow2, "cuda")
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the interpreter test above runs the logic")
def test_swiglu_on_the_gpu(without_interpreter):
    """The same checks with the compiled kernels against torch's CUDA ops, in a subprocess (this process imported
    the kernels under TRITON_INTERPRET=1): Triton's exp against CUDA's expf is what the bounds must hold."""
    without_interpreter(_GPU_CHECK)  # this folder is on its path


def test_fp8_experts_run_swiglu_in_eager_mode(monkeypatch):
    """F.silu takes the kernels (forward and backward): with I a multiple of 128 the ones that also quantise
    (fp8_linear.FUSE_SWIGLU_QUANT), else, or with that switch off, the plain ones; another activation the torch ops.
    The model passes F.silu for hidden_act "silu"."""
    from modeling_deepseek_v3.kernels import fp8_experts_forward
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    calls = []
    for name in ("swiglu", "swiglu_forward", "swiglu_backward"):
        monkeypatch.setattr(FL, name, lambda *a, name=name, **k: calls.append(name) or getattr(SW, name)(*a, **k))
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 256, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(11)])
    wt = torch.rand(11, 2, generator=g)
    for I, fuse, expected in ((128, True, ["swiglu_forward", "swiglu_backward"]), (128, False, ["swiglu"]),  # noqa: E741
                              (64, True, ["swiglu"])):  # fmt: skip
        monkeypatch.setattr(FL, "FUSE_SWIGLU_QUANT", fuse)
        gu = (torch.randn(4, 2 * I, 256, generator=g) * 0.05).requires_grad_()
        dn = (torch.randn(4, 256, I, generator=g) * 0.05).requires_grad_()
        calls.clear()
        y = fp8_experts_forward(h, idx, wt, gu, dn)
        y.sum().backward()
        assert calls == expected and gu.grad.abs().sum() > 0, (I, fuse, calls)
        calls.clear()
        y_gelu = fp8_experts_forward(h, idx, wt, gu, dn, act=F.gelu)
        assert calls == [] and not torch.equal(y_gelu, y)


def test_fp8_experts_inference_takes_a_tiling_from_the_swiglu_kernel(monkeypatch):
    """fp8_experts_inference (an FP8 checkpoint's experts) quantises a in the SwiGLU kernel where I is a multiple
    of 128: the same output, bit for bit, as SwiGLU and quantize_act apart."""
    from modeling_deepseek_v3.kernels import fp8_experts_inference, quantize_weight
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    g = torch.Generator().manual_seed(5)
    h = torch.randn(13, 256, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(13)])
    wt = torch.rand(13, 2, generator=g)
    gu = quantize_weight(torch.randn(4, 256, 256, generator=g) * 0.05)
    dn = quantize_weight(torch.randn(4, 256, 128, generator=g) * 0.05)
    calls = []
    monkeypatch.setattr(FL, "swiglu_forward", lambda *a: calls.append(1) or SW.swiglu_forward(*a))
    fused = fp8_experts_inference(h, idx, wt, *gu, *dn)
    monkeypatch.setattr(FL, "FUSE_SWIGLU_QUANT", False)
    apart = fp8_experts_inference(h, idx, wt, *gu, *dn)
    assert calls == [1] and fused.abs().sum() > 0 and torch.equal(fused, apart)


@pytest.mark.parametrize("act, kernel_calls", [(F.silu, 1), (F.gelu, 0)])
def test_fp8_mlp_runs_swiglu_in_eager_mode(monkeypatch, act, kernel_calls):
    """An FP8 MLP (dense, or the shared expert) runs gate and up as one GEMM and its SwiGLU as the kernel on that
    GEMM's [T, 2I] output (FP8Linear.forward_gated), for hidden_act "silu" only; output and every gradient match the
    projections run apart with torch's act(gate) * up (fp32: within the exp bound above, a few ulps)."""
    from modeling_deepseek_v3.kernels import FP8Linear
    from modeling_deepseek_v3.kernels import fp8_linear as FL

    from modeling_deepseek_v3 import DSV3Config
    from modeling_deepseek_v3.modeling_dsv3 import DSV3MLP

    hidden_act = "silu" if act is F.silu else "gelu"
    cfg = DSV3Config(hidden_size=256, intermediate_size=384, linear_implementation="fp8", hidden_act=hidden_act)
    torch.manual_seed(0)
    mlp = DSV3MLP(cfg)
    x = torch.randn(2, 5, 256).requires_grad_()
    dy = torch.randn(2, 5, 256)
    calls = []
    monkeypatch.setattr(FL, "swiglu", lambda h: calls.append(h.shape) or SW.swiglu(h))
    y = mlp(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in mlp.parameters()]
    assert calls == [(10, 768)] * kernel_calls
    x2 = x.detach().clone().requires_grad_()
    mlp.zero_grad()
    monkeypatch.setattr(FP8Linear, "forward_gated", staticmethod(lambda x, gate, up, act: act(gate(x)) * up(x)))
    y2 = mlp(x2)
    y2.backward(dy)
    for ours, apart in zip([y, *grads], [y2, x2.grad, *(p.grad for p in mlp.parameters())], strict=True):
        assert apart.abs().sum() > 0 and ((ours - apart).norm() / apart.norm()).item() < 1e-5
