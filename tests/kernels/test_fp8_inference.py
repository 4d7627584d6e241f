"""FP8 inference from an official-format FP8 checkpoint: weights stay e4m3 plus scales (no bf16 copy) and compute
through the kernels; logits stay close to the dequantised model's."""

import json
from pathlib import Path

import torch
from modeling_deepseek_v3.kernels import FP8InferenceLinear
from safetensors.torch import load_file, save_file

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.publish import FP8_QUANTIZATION_CONFIG, quantize_state_dict_fp8

DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"


def fp8_checkpoint(tmp_path: Path) -> Path:
    # moe_intermediate_size 128: expert scale blocks never straddle gate and up (as at 671B, where it is 2048).
    cfg = DSV3Config.from_pretrained(DEBUG, vocab_size=256, hidden_size=128, moe_intermediate_size=128,
                                     num_hidden_layers=2)  # fmt: skip
    torch.manual_seed(0)
    DSV3ForCausalLM(cfg).save_pretrained(tmp_path / "bf")
    state = quantize_state_dict_fp8(load_file(tmp_path / "bf" / "model.safetensors"))
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_QUANTIZATION_CONFIG}))
    return out


def test_fp8_checkpoint_runs_in_fp8_without_a_float_copy(tmp_path, rel):
    folder = fp8_checkpoint(tmp_path)
    dequantised = DSV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fp8 = DSV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, linear_implementation="fp8", moe_implementation="fp8"
    )
    stored = load_file(folder / "model.safetensors")
    attn, experts = fp8.model.layers[0].self_attn, fp8.model.layers[1].mlp.experts
    assert isinstance(attn.q_a_proj, FP8InferenceLinear) and attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(attn.q_a_proj.weight.view(torch.uint8),
                       stored["model.layers.0.self_attn.q_a_proj.weight"].view(torch.uint8))  # fmt: skip
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.gate_up_proj_scale_inv[3, 1], stored["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"][0])
    # Every weight matrix except the embedding and output head is one byte per element.
    big = {n: p for n, p in fp8.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n and "lm_head" not in n
           and not n.endswith("gate.weight")}  # fmt: skip
    assert all(p.element_size() == 1 for p in big.values()), [n for n, p in big.items() if p.element_size() != 1]

    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ref, got = dequantised(ids).logits, fp8(ids).logits
    # Same e4m3 weights on both sides; the FP8 model also rounds every GEMM input to e4m3 per 1x128 tile (RMS
    # relative error ~0.026 per rounding, see tests/kernels/conftest.py). Along the deepest path, 5 rounded GEMMs
    # per layer (q_a -> q_b -> o_proj, gate/up -> down) x 2 layers = 10, adding in quadrature: sqrt(10) * 0.026
    # = 0.082 if nothing attenuates them. Measured 0.088 (routing near-ties in a random model flip a few experts);
    # the bound allows 1.5x the estimate. It holds at this size; a random model at V3's widths sits above it, where
    # the MLPs' outputs dwarf the residual and the SwiGLU gate amplifies the attention's rounding: there a torch
    # simulation of the recipe is as far from bf16 as the kernels are (benchmarks/bench_fp8_inference.py, RESULTS.md).
    assert rel(got, ref) < 1.5 * 10**0.5 * 0.026
    # Decoding reads the latent cache through the absorbed path with the dequantised kv_b_proj.
    out = fp8.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 15)

    # Saving writes the checkpoint back bit for bit.
    fp8.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == stored.keys()
    for name, tensor in stored.items():
        a, b = again[name], tensor
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b), name  # fmt: skip


def test_fast_decode_runs_on_fp8_weights(tmp_path):
    """The static-cache decode path over e4m3 weights gives generate()'s tokens (same FP8 model, fp32 activations)."""
    from modeling_deepseek_v3.fast_decode import fast_greedy_generate

    folder = fp8_checkpoint(tmp_path)
    model = DSV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, linear_implementation="fp8",
                                            moe_implementation="fp8")  # fmt: skip
    ids = torch.randint(2, 256, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = fast_greedy_generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(got, expected)


def test_decoding_rows_through_fp8_gemv(tmp_path, monkeypatch, rel, tol):
    """With fp8_linear.GEMV_MAX_ROWS at 16, every projection of a 14-row forward runs fp8_gemv (x quantised inside
    it) instead of quantize_act + fp8_gemm: the same recipe, so the logits agree to the fp32 summation order."""
    import importlib

    fp8_linear = importlib.import_module("modeling_deepseek_v3.kernels.fp8_linear")
    folder = fp8_checkpoint(tmp_path)
    model = DSV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, linear_implementation="fp8",
                                            moe_implementation="fp8")  # fmt: skip
    ids = torch.randint(0, 256, (2, 7))
    gemv = importlib.import_module("modeling_deepseek_v3.kernels.fp8_gemv").fp8_gemv
    calls = []
    monkeypatch.setattr(fp8_linear, "fp8_gemv", lambda *a: calls.append(a[0].shape) or gemv(*a))
    two_step = model(ids).logits
    assert not calls
    monkeypatch.setattr(fp8_linear, "GEMV_MAX_ROWS", 16)
    forwards = []
    for m in model.modules():
        if isinstance(m, FP8InferenceLinear):
            m.register_forward_hook(lambda m, _a, _o: forwards.append((14, m.in_features)))
    through_gemv = model(ids).logits
    assert forwards and sorted(calls) == sorted(forwards)
    assert rel(through_gemv, two_step) < tol[torch.float32]  # 1e-5: the fp32 summation order
