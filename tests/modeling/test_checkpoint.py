"""Official-layout checkpoints: exact round trip, per-expert and MTP keys, strict errors, and (oracle 3) FP8."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from modeling_deepseek_v3 import DSV3ForCausalLM, DSV3Model
from modeling_deepseek_v3.checkpoint import dequantize_fp8_blocks


def random_model(tiny_config, **overrides):
    model = DSV3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


def all_keys(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text()) if (
        folder / "model.safetensors.index.json").exists() else None
    if index:
        return set(index["weight_map"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_round_trip_is_exact_and_keys_are_official(tiny_config, tmp_path):
    model = random_model(tiny_config, num_nextn_predict_layers=2)
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # forces several shards plus an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    keys = all_keys(tmp_path)
    cfg, N = model.config, model.config.num_hidden_layers
    for e in (0, cfg.n_routed_experts - 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    for k in (N, N + 1):  # the D MTP modules follow the main layers
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight",
                     "mlp.experts.3.up_proj.weight"):  # fmt: skip
            assert f"model.layers.{k}.{name}" in keys
    assert not any("mtp_layers" in k or "gate_up_proj" in k for k in keys)

    loaded = DSV3ForCausalLM.from_pretrained(tmp_path)
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, loaded(ids, labels=ids).loss)


def test_auto_classes_load_the_folder_without_remote_code(tiny_config, tmp_path):
    random_model(tiny_config).save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is DSV3ForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is DSV3Model  # the head is dropped on purpose for a base model


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_config, tmp_path):
    random_model(tiny_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.experts.7.down_proj.weight")
    state["model.layers.0.self_attn.not_a_weight"] = torch.ones(3)
    state["model.norm.weight"] = torch.ones(5)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        DSV3ForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys (1)" in message and "model.layers.1.mlp.experts.7.down_proj.weight" in message
    assert "unexpected keys (1)" in message and "not_a_weight" in message
    assert "model.norm.weight: checkpoint (5,) vs model (64,)" in message


def test_mtp_copies_must_equal_the_shared_embedding(tiny_config, tmp_path):
    random_model(tiny_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.3.embed_tokens.weight"] += 1.0
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shares the main embedding"):
        DSV3ForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ FP8 (oracle 3)
def quantize_fp8_blocks_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's published format: e4m3 weights, weight_scale_inv = amax/448 per 128x128 block (ragged edges)."""
    N, K = w.shape
    nb, kb = math.ceil(N / 128), math.ceil(K / 128)
    padded = torch.zeros(nb * 128, kb * 128)
    padded[:N, :K] = w.float()
    blocks = padded.view(nb, 128, kb, 128)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale_inv[:, None, :, None]).view(nb * 128, kb * 128)[:N, :K]
    return q.to(torch.float8_e4m3fn), scale_inv


def within_e4m3_error(approx: torch.Tensor, w: torch.Tensor) -> bool:
    """Round-to-nearest e4m3 error: half an ulp (2^-4 relative, 3 mantissa bits) for normal values, and half the
    subnormal spacing (2^-10 of the block scale) below 2^-6. Uses the largest block scale as a safe bound."""
    _, scale = quantize_fp8_blocks_ref(w)
    return bool(((approx - w).abs() <= w.abs() * 2**-4 + scale.max() * 2**-10).all())


def test_fp8_checkpoint_loads_and_matches_its_dequantised_reference(tiny_config, tmp_path):
    # Wider layers than the debug model so that blocks are ragged (e.g. 160 = 128 + 32 rows).
    model = random_model(tiny_config, hidden_size=160, intermediate_size=200, moe_intermediate_size=48)
    model.save_pretrained(tmp_path / "bf")
    state = load_file(tmp_path / "bf" / "model.safetensors")
    fp8_state, reference = {}, {}
    for name, w in state.items():
        quantised = w.dim() == 2 and "proj" in name and "shared_head.head" not in name
        if quantised:
            q, s = quantize_fp8_blocks_ref(w)
            fp8_state[name], fp8_state[name + "_scale_inv"] = q, s
            reference[name] = q.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        else:
            fp8_state[name] = reference[name] = w
    assert fp8_state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)  # [ceil(40/128), ceil(160/128)]
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8_state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ref").mkdir()
    save_file(reference, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())

    fp8 = DSV3ForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = DSV3ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        # Same dequantised numbers on both sides: equal up to fp32 rounding of the scale product.
        assert (fp8(ids).logits - ref(ids).logits).abs().max() <= 1e-5
        # And the quantisation itself is the e4m3 error (3 mantissa bits, <= 2^-4 relative per weight).
        w = model.model.layers[0].self_attn.q_b_proj.weight
        w_fp8 = fp8.model.layers[0].self_attn.q_b_proj.weight
        assert within_e4m3_error(w_fp8, w) and not torch.equal(w_fp8, w)
    assert fp8.dtype == torch.float32


def test_dequantize_handles_ragged_blocks():
    w = torch.randn(576, 200)
    q, s = quantize_fp8_blocks_ref(w)
    assert s.shape == (5, 2)
    back = dequantize_fp8_blocks(q, s)
    assert back.shape == w.shape and within_e4m3_error(back, w)
