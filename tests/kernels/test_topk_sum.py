"""kernels/topk_sum.py: the routed experts' top-k sum as one kernel (eager mode, on by default), against the per-slot
order that _sum_slots computes under torch.compile (modeling_dsv3._sum_slots_in_slot_order, the very code it runs), and
slot_dots, the routing weights' gradient, against the exact dot. Through the FP8 experts:
test_fp8_linear.py::test_fp8_experts_with_the_topk_sum_kernel and test_fp8_experts_gathered_rows_equal_the_rows_written_out."""

import subprocess
import sys

import pytest
import torch
from modeling_deepseek_v3.kernels import topk_sum

from modeling_deepseek_v3.modeling_dsv3 import _sum_slots_in_slot_order


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("T, KT, S, D", [(13, 3, 40, 300), (5, 8, 12, 1100), (1, 1, 1, 7)])
def test_topk_sum_equals_the_slot_order_bit_for_bit(T, KT, S, D, dtype, weighted):
    """Rows repeat across tokens and slots, D is ragged against the 1024-wide block, weights are random in (0, 1) so
    that bf16 products land near rounding ties, and a tenth of y is exactly zero (negative zeros included)."""
    g = torch.Generator().manual_seed(T * 100 + KT * 10 + D)
    y = torch.randn(S, D, generator=g) * torch.logspace(-2, 2, D)
    y[torch.rand(S, D, generator=g) < 0.1] = 0.0
    y[0, : D // 2] = -0.0
    y = y.to(dtype)
    rows = torch.randint(0, S, (T, KT), generator=g)
    weight = torch.rand(T, KT, generator=g).to(dtype) if weighted else None
    out = topk_sum.sum_slots(y, rows, weight)
    ref = _sum_slots_in_slot_order(y, rows, weight)
    assert out.dtype == dtype and out.shape == (T, D)
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T, KT, S, D", [(13, 3, 40, 300), (5, 8, 12, 1100), (7, 6, 9, 513), (1, 1, 1, 7)])
def test_slot_dots_within_one_rounding_of_the_exact_dot(T, KT, S, D, dtype, monkeypatch):
    """dweight[t, k] = dout[t] . y[row[t, k]] from the kernel, and from the per-slot torch code that runs under
    torch.compile (modeling_dsv3._slot_dots with the switch off), against the exact value in fp64. Bound: one rounding
    to the output dtype (half an ulp) over an fp32 sum of D products, each exact for bf16 inputs and rounded once
    for fp32 (at most (D + 1) * 2^-24 of the sum of their magnitudes). Rows repeat across tokens and slots; D is
    ragged against the 512-wide block and Kt is not a power of two in one case."""
    from modeling_deepseek_v3 import modeling_dsv3 as M

    g = torch.Generator().manual_seed(T * 100 + KT * 10 + D)
    y = (torch.randn(S, D, generator=g) * torch.logspace(-1, 1, D)).to(dtype)
    dout = torch.randn(T, D, generator=g).to(dtype)
    rows = torch.randint(0, S, (T, KT), generator=g)
    products = dout.double()[:, None, :] * y.double()[rows]
    exact = products.sum(-1)
    half_ulp = 2**-8 if dtype == torch.bfloat16 else 2**-24
    bound = half_ulp * exact.abs() + (D + 1) * 2**-24 * products.abs().sum(-1)
    out = topk_sum.slot_dots(dout, y, rows)
    monkeypatch.setattr(topk_sum, "SLOT_DOTS_KERNEL", False)
    fallback = M._slot_dots(dout, y, rows)
    for got in (out, fallback):
        assert got.dtype == dtype and got.shape == (T, KT)
        assert ((got.double() - exact).abs() <= bound).all()
    # The bound is tight enough to see a dropped feature: without the last one, some dot leaves it.
    assert ((products[..., :-1].sum(-1) - exact).abs() > bound).any()


_COMPILE = """
import importlib
import sm90

M = importlib.import_module("modeling_deepseek_v3.kernels.topk_sum")
k = M._sum_slots_kernel
cases = [(k, dict(y_ptr="*" + dtype, row_ptr="*i64", w_ptr="*" + dtype, out_ptr="*" + dtype, D="i32", KT="constexpr",
                  BLOCK_D="constexpr", WEIGHTED="constexpr"), dict(KT=8, BLOCK_D=1024, WEIGHTED=weighted))
         for dtype, weighted in (("bf16", True), ("bf16", False), ("fp32", True))]
cases += [(M._slot_dots_kernel, dict(g_ptr="*" + dtype, y_ptr="*" + dtype, row_ptr="*i64", out_ptr="*" + dtype, D="i32",
                                     KT="constexpr", KT_P2="constexpr", BLOCK_D="constexpr"),
           dict(KT=8, KT_P2=8, BLOCK_D=512)) for dtype in ("bf16", "fp32")]
SW = importlib.import_module("modeling_deepseek_v3.kernels.swiglu")
for dtype in ("bf16", "fp32"):
    # plain, and with the 1x128 quantisation of the output (the FP8 experts' fused form)
    for quant, extra in ((dict(q_ptr="constexpr", s_ptr="constexpr"), dict(q_ptr=None, s_ptr=None, BLOCK_R=8, BLOCK_C=256)),
                         (dict(q_ptr="*fp8e4nv", s_ptr="*fp32", QUANT="constexpr", POW2="constexpr"),
                          dict(BLOCK_R=SW.QUANT_BLOCK_ROWS, BLOCK_C=128, QUANT=True, POW2=False))):
        cases += [(SW._swiglu_fwd_kernel, dict(h_ptr="*" + dtype, a_ptr="*" + dtype, **quant, S="i32", I="i32",
                                               BLOCK_R="constexpr", BLOCK_C="constexpr"), extra),
                  (SW._swiglu_bwd_kernel, dict(h_ptr="*" + dtype, da_ptr="*" + dtype, dh_ptr="*" + dtype, **quant,
                                               S="i32", I="i32", BLOCK_R="constexpr", BLOCK_C="constexpr"), extra)]
RT = importlib.import_module("modeling_deepseek_v3.kernels.router_topk")
cases += [(RT._route_topk_kernel, dict(scores_ptr="*fp32", bias_ptr="*fp32", idx_ptr="*i64", T="i32", E="constexpr",
                                       G="constexpr", TOPK_GROUP="constexpr", KT="constexpr", BLOCK_T="constexpr"),
           dict(E=256, G=8, TOPK_GROUP=4, KT=8, BLOCK_T=16))]
for k, sig, constexprs in cases:
    report, _ = sm90.assemble(sm90.compile_ptx(k, sig, constexprs))
    assert sm90.spill_free(report), (k.__name__, constexprs, report)
print("ok")
"""


def test_eager_moe_kernels_compile_for_sm90(without_interpreter):
    """topk_sum's, swiglu's and router_topk's kernels have run only in the interpreter here: they must build for sm_90 (bf16 and
    fp32, weighted or not) without spills (a subprocess without TRITON_INTERPRET)."""
    without_interpreter(_COMPILE)


_CHOOSE_ON_A_GPU = """
import torch
import modeling_deepseek_v3.kernels as kernels
from modeling_deepseek_v3 import modeling_dsv3

kernels.require_fp8 = lambda what: None  # as where the FP8 kernels run: a Hopper GPU with Triton
for module in ("topk_sum", "router_topk"):
    chosen = modeling_dsv3._eager_kernels(torch.device("cuda"), module)
    assert chosen is not None and chosen.__name__ == f"modeling_deepseek_v3.kernels.{module}", chosen
    assert modeling_dsv3._eager_kernels(torch.device("cpu"), module) is None
print("ok")
"""


def test_model_finds_the_eager_kernels_where_they_run():
    """Where the kernels can run, the model's eager MoE takes kernels/topk_sum.py and its router kernels/router_topk.py
    even when nothing imported those submodules before (a fresh interpreter: here other tests have imported them). It
    once read topk_sum as an attribute of the package, which it is only after an import, and a V3 layer on the H200
    failed with AttributeError."""
    out = subprocess.run([sys.executable, "-c", _CHOOSE_ON_A_GPU], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]
