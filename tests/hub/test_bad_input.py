"""Bad input is refused with a clear error before anything is written: OUT_DIR never appears, no staging left."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from modeling_deepseek_v3 import publish as publish_mod
from modeling_deepseek_v3.publish import PublishArgs, PublishError, publish


def refused(model_dir, out, match, **kwargs):
    with pytest.raises(PublishError, match=match):
        publish(PublishArgs(str(model_dir), str(out), **kwargs))
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_missing_tokenizer(model_copy, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_copy / name).unlink(missing_ok=True)
    refused(model_copy, tmp_path / "out", "no tokenizer files")
    refused(model_copy, tmp_path / "out", "no tokenizer files", tokenizer=str(tmp_path / "nowhere"))


def test_config_weights_mismatch(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps(config | {"moe_intermediate_size": 48}))
    refused(model_copy, tmp_path / "out", "config and weights do not match(.|\n)*mis-shaped")
    (model_copy / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    refused(model_copy, tmp_path / "out", "config and weights do not match(.|\n)*unexpected")


def test_non_finite_weight(model_copy, tmp_path):
    path = model_copy / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.self_attn.kv_b_proj.weight"][3, 4] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    refused(model_copy, tmp_path / "out", "non-finite(.|\n)*kv_b_proj")


def test_tokenizer_larger_than_vocabulary(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps(config | {"vocab_size": 1000}))
    state = {k: v[:1000] if v.shape[:1] == (129280,) else v for k, v in load_file(model_copy / "model.safetensors").items()}
    save_file(state, model_copy / "model.safetensors", metadata={"format": "pt"})
    refused(model_copy, tmp_path / "out", "128,815 tokens but the model's vocab_size is 1,000")


def test_not_a_model_folder_and_non_empty_output(model_copy, tmp_path):
    refused(tmp_path / "nothing", tmp_path / "out", "no config.json")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty"):
        publish(PublishArgs(str(model_copy), str(busy)))
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_cli_reports_the_error(model_copy, tmp_path, capsys):
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer_config.json").unlink()
    assert publish_mod.main([str(model_copy), str(tmp_path / "out")]) == 2
    assert "dsv3 publish: error: no tokenizer files" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_an_earlier_publish_and_never_an_input(original, model_copy, tmp_path):
    out = publish(PublishArgs(str(model_copy), str(tmp_path / "out")))
    assert publish(PublishArgs(str(original[1]), str(out), overwrite=True, model_name="again")) == out
    assert "# again" in (out / "README.md").read_text()
    # Publishing a folder onto itself (or onto a folder that holds it) would delete the weights being read.
    with pytest.raises(PublishError, match="would be deleted"):
        publish(PublishArgs(str(out), str(out), overwrite=True))
    with pytest.raises(PublishError, match="not a `dsv3 publish` output"):
        publish(PublishArgs(str(model_copy), str(tmp_path), overwrite=True))
    assert (model_copy / "model.safetensors").is_file() and (out / "model.safetensors").is_file()


def test_code_that_needs_this_package_is_not_published(tmp_path):
    from modeling_deepseek_v3.publish import CODE_FILES, check_code_is_self_contained

    for name in CODE_FILES:
        (tmp_path / name).write_text("import torch\nfrom .configuration_dsv3 import X\n")
    check_code_is_self_contained(tmp_path)
    (tmp_path / "modeling_dsv3.py").write_text("from .kernels import fp8_gemm\n")
    with pytest.raises(PublishError, match="not among the published files"):
        check_code_is_self_contained(tmp_path)
    (tmp_path / "modeling_dsv3.py").write_text("import modeling_deepseek_v3.kernels\ntry:\n    import triton\nexcept ImportError:\n    pass\n")
    with pytest.raises(PublishError, match=r"\['modeling_deepseek_v3'\]"):  # triton is guarded: allowed
        check_code_is_self_contained(tmp_path)
