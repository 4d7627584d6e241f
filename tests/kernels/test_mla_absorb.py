"""Absorbed MLA's products from an e4m3 kv_b_proj (kernels/mla_absorb.py) vs the path they replace (dequantise the
whole matrix, then einsum), under Triton's interpreter; and the FP8 model's absorbed attention with them."""

import importlib
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from modeling_deepseek_v3.kernels import FP8InferenceLinear, dequantize_weight_ref, quantize_weight_ref  # noqa: E402

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM  # noqa: E402

A = importlib.import_module("modeling_deepseek_v3.kernels.mla_absorb")
DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"

# (T, H, n, v, R): the debug model's heads (a 128x128 scale block spans all four heads' rows); one V3 head pair
# (n = v = 128, R = 512: a head's W_UK and W_UV are one block row each); odd widths whose heads straddle scale
# blocks and a ragged R; more tokens than one 64-token tile.
SHAPES = [(1, 4, 16, 16, 32), (3, 2, 128, 128, 512), (17, 3, 24, 40, 200), (70, 4, 16, 16, 32)]


def _case(T, H, n, v, R, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    wq, ws = quantize_weight_ref(
        torch.randn(H * (n + v), R, generator=g) * (0.01 + torch.rand(H * (n + v), 1, generator=g))
    )
    q_nope = torch.randn(T, H, n + 8, generator=g).to(dtype)[..., :n]  # a strided view, as q's split gives
    o_lat = torch.randn(T, H, R, generator=g).to(dtype)
    return q_nope, o_lat, wq, ws


@pytest.mark.parametrize("T,H,n,v,R", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_dequantise_then_einsum(T, H, n, v, R, dtype, tol, rel):
    """fp32: the same dequantised weights (each w * scale rounded once) and fp32 sums in another order. bf16: the
    reference's einsum and output rounded to bf16 as torch rounds, the kernels' output cast as the interpreter
    truncates (TOL[bf16])."""
    q_nope, o_lat, wq, ws = _case(T, H, n, v, R, dtype, seed=T + n + R)
    q_lat = A.absorb_query(q_nope, wq, ws, v)
    out = A.absorb_output(o_lat, wq, ws, n, v)
    assert q_lat.shape == (T, H, R) and out.shape == (T, H, v) and q_lat.dtype == out.dtype == dtype
    assert rel(q_lat, A.absorb_query_ref(q_nope, wq, ws, v)) < tol[dtype]
    assert rel(out, A.absorb_output_ref(o_lat, wq, ws, n, v)) < tol[dtype]


def test_each_head_reads_its_own_rows(rel, tol):
    """A head's products must come from its own W_UK / W_UV rows: with one head's rows of W scaled, only that
    head's outputs change, by that factor."""
    T, H, n, v, R = 2, 3, 24, 40, 200
    q_nope, o_lat, wq, ws = _case(T, H, n, v, R, torch.float32, seed=5)
    w = dequantize_weight_ref(wq, ws, torch.float32)
    w[(n + v) : 2 * (n + v)] *= 2  # head 1
    wq2, ws2 = quantize_weight_ref(w)
    q1, q2 = A.absorb_query(q_nope, wq, ws, v), A.absorb_query(q_nope, wq2, ws2, v)
    o1, o2 = A.absorb_output(o_lat, wq, ws, n, v), A.absorb_output(o_lat, wq2, ws2, n, v)
    for h in (0, 2):
        assert rel(q2[:, h], q1[:, h]) < tol[torch.float32] and rel(o2[:, h], o1[:, h]) < tol[torch.float32]
    assert rel(q2[:, 1], 2 * q1[:, 1]) < tol[torch.float32] and rel(o2[:, 1], 2 * o1[:, 1]) < tol[torch.float32]


def test_bad_inputs_say_why():
    q_nope, o_lat, wq, ws = _case(2, 4, 16, 16, 32, torch.float32, seed=0)
    with pytest.raises(AssertionError, match="rows"):
        A.absorb_query(q_nope, wq, ws, v=8)
    with pytest.raises(AssertionError, match="unit last stride"):
        A.absorb_query(q_nope.transpose(1, 2).contiguous().transpose(1, 2), wq, ws, v=16)
    with pytest.raises(AssertionError, match="last dim must be 32"):
        A.absorb_output(o_lat[..., :16], wq, ws, 16, 16)
    with pytest.raises(AssertionError, match="W scales"):
        A.absorb_output(o_lat, wq, ws[:, :0], 16, 16)


def test_fp8_model_absorbs_from_e4m3(tmp_path, rel, tol):
    """The FP8 model's absorbed attention (prefill and decode) through the kernels gives the logits of the same model
    whose kv_b_proj is an nn.Linear holding the dequantised weight (the path the kernels replace)."""
    cfg = DSV3Config.from_pretrained(DEBUG, vocab_size=256, num_hidden_layers=2, num_nextn_predict_layers=0,
                                     mla_implementation="absorbed", linear_implementation="fp8")  # fmt: skip
    torch.manual_seed(0)
    fp8 = DSV3ForCausalLM(cfg).eval()
    dense = DSV3ForCausalLM(cfg).eval()
    dense.load_state_dict(fp8.state_dict())
    swapped = 0
    for module in dense.modules():
        kv_b = getattr(module, "kv_b_proj", None)
        if kv_b is not None:
            fp8_kv_b = FP8InferenceLinear.from_linear(torch.nn.Linear(kv_b.in_features, kv_b.out_features, bias=False))
            linear = torch.nn.Linear(kv_b.in_features, kv_b.out_features, bias=False)
            linear.weight.data = fp8_kv_b.dequantized_weight(torch.float32)
            module.kv_b_proj = linear
            fp8_module = fp8.get_submodule(next(n for n, m in dense.named_modules() if m is module))
            fp8_module.kv_b_proj = fp8_kv_b
            swapped += 1
    assert swapped == cfg.num_hidden_layers
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = fp8(ids).logits, dense(ids).logits
    assert rel(a, b) < tol[torch.float32]
    out_a = fp8.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_a, dense.generate(ids, max_new_tokens=4, do_sample=False))


_COMPILE = """
import importlib
import sm90

A = importlib.import_module("modeling_deepseek_v3.kernels.mla_absorb")
common = dict(w_ptr="*fp8e4nv", ws_ptr="*fp32", T="i32", H="i32", R="i32", n="i32", head_rows="i32",
              BLOCK_T="constexpr", IEEE="constexpr", UPCAST="constexpr")
cases = [(A._absorb_query_kernel, dict(q_ptr="*bf16", out_ptr="*bf16", stride_qt="i32", stride_qh="i32", NP="constexpr",
                                       BLOCK_R="constexpr", **common), dict(NP=128, BLOCK_R=A.QUERY_TILE_R)),
         (A._absorb_output_kernel, dict(o_ptr="*bf16", out_ptr="*bf16", v="i32", stride_ot="i32", stride_oh="i32",
                                        BLOCK_V="constexpr", BLOCK_K="constexpr", **common),
          dict(BLOCK_V=A.OUTPUT_TILE[0], BLOCK_K=A.OUTPUT_TILE[1]))]
for k, sig, consts in cases:
    for bt in (16, 64):
        ptx = sm90.compile_ptx(k, sig, dict(BLOCK_T=bt, IEEE=False, UPCAST=False, **consts))
        report, _ = sm90.assemble(ptx)
        assert sm90.spill_free(report), (k.__name__, bt, report)
        assert "mma" in ptx, (k.__name__, bt)  # on the tensor cores
print("ok")
"""


def test_kernels_compile_for_sm90_without_spills(without_interpreter):
    """The interpreter never compiles them: both kernels at V3's head shape (n = v = 128, bf16), for decoding's
    16-token tile and the 64-token one, must build for sm_90 without spills. A subprocess without TRITON_INTERPRET."""
    without_interpreter(_COMPILE)


_GPU_CHECK = """
import importlib
import torch
from modeling_deepseek_v3.kernels import quantize_weight

A = importlib.import_module("modeling_deepseek_v3.kernels.mla_absorb")
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
for T, H, n, v, R in [(1, 128, 128, 128, 512), (16, 128, 128, 128, 512), (100, 16, 24, 40, 200)]:
    wq, ws = quantize_weight(torch.randn(H * (n + v), R, device="cuda").bfloat16() * 0.05)
    for dtype, bound in ((torch.bfloat16, 5e-3), (torch.float32, 1e-6)):
        q_nope = torch.randn(T, H, n + 64, device="cuda").to(dtype)[..., :n]
        o_lat = torch.randn(T, H, R, device="cuda").to(dtype)
        # bf16: the reference's einsum rounds its output to bf16 as the kernels do (<= 2^-9 each, RMS ~1.1e-3)
        e_q = rel(A.absorb_query(q_nope, wq, ws, v), A.absorb_query_ref(q_nope, wq, ws, v))
        e_o = rel(A.absorb_output(o_lat, wq, ws, n, v), A.absorb_output_ref(o_lat, wq, ws, n, v))
        assert e_q < bound and e_o < bound, (T, H, n, v, R, dtype, e_q, e_o)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_mla_absorb_on_the_gpu(without_interpreter):
    """Both kernels compiled for the GPU at V3's shape (128 heads, decoding's 1 and 16 tokens) and an odd one, bf16 and
    fp32, against the dequantise-then-einsum reference. A subprocess without TRITON_INTERPRET."""
    without_interpreter(_GPU_CHECK)
