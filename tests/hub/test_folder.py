"""What the published folder holds: config with auto_map, the code files, weights in the official layout, the
tokenizer and generation config; and the bf16 option."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

import modeling_deepseek_v3
from modeling_deepseek_v3.checkpoint import official_state_dict
from modeling_deepseek_v3.publish import AUTO_MAP, CODE_FILES, PublishArgs, publish
from modeling_deepseek_v3.tokenizer import load_tokenizer

PACKAGE = Path(modeling_deepseek_v3.__file__).parent


def test_folder_contents(original, published):
    config = json.loads((published / "config.json").read_text())
    assert config["model_type"] == "dsv3" and config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["DSV3ForCausalLM"] and config.get("quantization_config") is None
    for name in CODE_FILES:  # verbatim copies: the folder runs the code the tests ran
        assert (published / name).read_bytes() == (PACKAGE / name).read_bytes()
    weight_map = json.loads((published / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1  # sharded
    assert set(weight_map) == set(official_state_dict(original[0]))  # official names, MTP at layer 3
    assert "model.layers.3.eh_proj.weight" in weight_map and "model.layers.3.mlp.experts.15.down_proj.weight" in weight_map
    generation = json.loads((published / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)
    tokenizer_config = json.loads((published / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config
    text = "Multi-head Latent Attention: 576 values per token."
    assert load_tokenizer(published)(text)["input_ids"] == load_tokenizer()(text)["input_ids"]


def test_bfloat16_export_keeps_the_router_bias_in_fp32(original, tmp_path):
    out = publish(PublishArgs(str(original[1]), str(tmp_path / "bf16"), dtype="bfloat16"))
    reference = official_state_dict(original[0])
    with safe_open(out / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
                assert t.dtype == torch.float32 and torch.equal(t, reference[name]), name
            else:
                assert t.dtype == torch.bfloat16 and torch.equal(t, reference[name].bfloat16()), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
