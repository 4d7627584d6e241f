"""FP8 export: official keys, dtypes and scale shapes; re-import within the tolerance documented in publish.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.checkpoint import official_layout, official_state_dict
from modeling_deepseek_v3.publish import (
    FP8_QUANTIZATION_CONFIG,
    FP8_WEIGHT,
    quantize_fp8_block,
    quantize_state_dict_fp8,
)

CONFIG_671B = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-671b"
NOT_QUANTISED = re.compile(r"(layernorm|norm|enorm|hnorm|embed_tokens|mlp\.gate|lm_head|shared_head\.head|e_score_correction_bias)")


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    assert set(out) == set(index["weight_map"])
    return out


def scale_shape(shape) -> tuple[int, int]:
    return math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)


def test_fp8_keys_dtypes_and_config(original, published_fp8):
    model, _ = original
    reference = official_state_dict(model)
    stored = read_folder(published_fp8)
    quantised = {n for n in reference if FP8_WEIGHT.search(n)}
    assert quantised and not {n for n in quantised if NOT_QUANTISED.search(n.rsplit(".", 2)[-2])}
    assert set(stored) == set(reference) | {n + "_scale_inv" for n in quantised}
    for name in reference:
        if name in quantised:
            assert stored[name].dtype == torch.float8_e4m3fn and stored[name].shape == reference[name].shape
            scale = stored[name + "_scale_inv"]
            assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(reference[name].shape)
        else:
            assert torch.equal(stored[name], reference[name]), name  # untouched, bit for bit
    config = json.loads((published_fp8 / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG and config["model_type"] == "dsv3"


def test_fp8_reimport_within_documented_tolerance(original, published_fp8):
    model, _ = original
    reference = official_state_dict(model)
    stored = read_folder(published_fp8)
    reloaded = official_state_dict(DSV3ForCausalLM.from_pretrained(published_fp8, dtype=torch.float32))
    for name, w in reference.items():
        if not FP8_WEIGHT.search(name):
            assert torch.equal(reloaded[name], w), name
            continue
        # publish.py: |dequant(w) - w| <= |w| / 16 + s / 1024 per element, s the block scale (fp32 slack 1e-6).
        s = stored[name + "_scale_inv"].repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        bound = (w.abs() / 16 + s / 1024) * (1 + 1e-6)
        assert ((reloaded[name] - w).abs() <= bound).all(), name
    # The model as a whole: quantisation noise of a few percent per weight, not a broken mapping.
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        got = DSV3ForCausalLM.from_pretrained(published_fp8, dtype=torch.float32)(ids).logits
    assert (got - want).norm() / want.norm() < 0.05


def test_quantiser_handles_ragged_and_zero_blocks():
    w = torch.randn(200, 130)
    w[128:, :] = 0.0  # a whole row of zero blocks: finite scale, exact zeros
    q, s = quantize_fp8_block(w)
    assert q.shape == w.shape and s.shape == (2, 2) and torch.isfinite(s).all() and (s > 0).all()
    deq = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    assert torch.equal(deq[128:], w[128:])
    assert q.float().abs().max() == 448.0  # each block's amax maps to e4m3's largest value


def test_scale_shapes_at_671b_follow_the_official_layout():
    config = DSV3Config.from_pretrained(CONFIG_671B)
    with torch.device("meta"):  # shapes only: 671B parameters never materialise
        model = DSV3ForCausalLM(config)
        internal = model.state_dict()
        state = {name: internal[slot.key][slot.index] if slot.index else internal[slot.key]
                 for name, slot in official_layout(model).items()}  # fmt: skip
        L = config.num_hidden_layers  # 61: the MTP layer is model.layers.61
        # Meta tensors still dispatch every op (~1.5 ms a tensor): quantise a dense, a MoE and the MTP layer, with
        # three of their 256 experts, through the real code path; count the whole model by name below.
        sample = re.compile(rf"^(lm_head|model\.(embed_tokens|norm)|model\.layers\.(0|3|{L})\.(?!mlp\.experts\.(?!(0|7|255)\.)))")
        quantised = quantize_state_dict_fp8({n: t for n, t in state.items() if sample.match(n)})
    scales = {n.removesuffix("_scale_inv"): tuple(t.shape) for n, t in quantised.items() if n.endswith("_scale_inv")}
    expected = {
        "model.layers.0.self_attn.q_a_proj.weight": (12, 56),  # [1536, 7168]
        "model.layers.0.self_attn.q_b_proj.weight": (192, 12),  # [128 * 192, 1536]
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (5, 56),  # [512 + 64, 7168]
        "model.layers.0.self_attn.kv_b_proj.weight": (256, 4),  # [128 * (128 + 128), 512]
        "model.layers.0.self_attn.o_proj.weight": (56, 128),  # [7168, 128 * 128]
        "model.layers.0.mlp.gate_proj.weight": (144, 56),  # dense [18432, 7168]
        "model.layers.0.mlp.down_proj.weight": (56, 144),
        "model.layers.3.mlp.experts.255.up_proj.weight": (16, 56),  # [2048, 7168]
        "model.layers.3.mlp.experts.0.down_proj.weight": (56, 16),
        "model.layers.3.mlp.shared_experts.gate_proj.weight": (16, 56),
        f"model.layers.{L}.eh_proj.weight": (56, 112),  # [7168, 2 * 7168]
        f"model.layers.{L}.mlp.experts.7.gate_proj.weight": (16, 56),
    }
    assert {n: scales[n] for n in expected} == expected
    assert all(scales[n] == scale_shape(state[n].shape) for n in scales)
    assert quantised["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    # Per MoE layer: 256 experts x 3 + shared 3 + attention 5; dense layers: 3 + 5; MTP adds eh_proj.
    moe_layers = L + 1 - config.first_k_dense_replace
    selected = [n for n, t in state.items() if FP8_WEIGHT.search(n) and t.dim() == 2]
    assert len(selected) == moe_layers * (256 * 3 + 3 + 5) + config.first_k_dense_replace * (3 + 5) + 1
    assert not any(NOT_QUANTISED.search(n.rsplit(".", 2)[-2]) for n in selected)
    assert set(scales) == {n for n in selected if sample.match(n)}
