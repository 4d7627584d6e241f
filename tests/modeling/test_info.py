"""`dsv3 info`: the analytical counts equal an instantiated model's, and the 671B config reproduces the paper."""

from __future__ import annotations

import json

import pytest

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.cli import main as cli_main
from modeling_deepseek_v3.info import find_config_file, load_config, model_stats


def counted(model: DSV3ForCausalLM) -> dict[str, int]:
    """Counts from the instantiated model, with info.py's conventions (see its docstring)."""
    c = model.config
    main = mtp = routed = 0
    for name, p in model.named_parameters():  # named_parameters lists a tied tensor once
        if name.startswith("model.mtp_layers."):
            mtp += p.numel()
            continue
        main += p.numel()
        if ".mlp.experts." in name:
            routed += p.numel()
    embed = 0 if c.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    embed_row = 0 if c.tie_word_embeddings else c.hidden_size  # a lookup reads one row
    activated = main - routed - embed + embed_row + routed * c.num_experts_per_tok // c.n_routed_experts
    return {"total_params": main, "mtp_params": mtp, "routed_expert_params": routed, "activated_params": activated}


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the debug config as shipped (real vocabulary)
        {"vocab_size": 512, "q_lora_rank": None, "attention_bias": True},
        {"vocab_size": 512, "tie_word_embeddings": True, "n_shared_experts": 0, "num_nextn_predict_layers": 2},
        {"vocab_size": 512, "first_k_dense_replace": 0, "moe_layer_freq": 2, "num_nextn_predict_layers": 0},
    ],
)
def test_counts_match_instantiated_model(overrides):
    config = load_config("deepseek-v3-debug")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    model = DSV3ForCausalLM(config)
    stats = model_stats(config)
    for key, value in counted(model).items():
        assert stats[key] == value, key
    if config.num_nextn_predict_layers == 0:
        assert stats["mtp_params"] == stats["mtp_checkpoint_params"] == 0


def test_671b_reproduces_the_paper():
    s = model_stats(load_config("deepseek-v3-671b"))
    assert round(s["total_params"] / 1e9) == 671
    assert round(s["activated_params"] / 1e9) == 37  # 36.63B: head in full, embedding one row
    # The whole embedding table would overshoot the paper's 37B: 37.55B.
    assert round(s["activated_params_full_embedding"] / 1e9) == 38
    # 14B = 685B (HF repo: main + MTP with its copies + FP8 scales) - 671B; the module's own parameters are 11.6B.
    assert round(s["fp8_checkpoint_tensor_values"] / 1e9) == 685
    assert s["mtp_params_paper"] == 14
    assert round(s["mtp_params"] / 1e9) == 12
    assert round(s["mtp_checkpoint_params"] / 1e9) == 13
    assert s["kv_cache_bytes_per_token"] == 70272  # 61 layers x (512 + 64) values x 2 B
    assert s["expanded_kv_cache_bytes_per_token"] == 61 * 128 * (192 + 128) * 2


def test_flops_convention():
    config = load_config("deepseek-v3-debug")
    s1, s2 = model_stats(config, seq_len=1), model_stats(config, seq_len=3)
    per_ctx = 2 * config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    assert s1["attention_flops_per_token"] == per_ctx  # one token attends to itself
    assert s2["attention_flops_per_token"] == 2 * per_ctx  # mean context of 3 causal positions
    assert s1["forward_flops_per_token"] == s1["matmul_flops_per_token"] + per_ctx


def test_cli_text_and_json(capsys):
    assert cli_main(["info", "deepseek-v3-671b"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "70,272 B" in out and "conventions" in out
    assert cli_main(["info", str(find_config_file("deepseek-v3-debug").parent), "--json", "--seq-len", "128"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (
        stats["seq_len"] == 128
        and stats["total_params"] == model_stats(load_config("deepseek-v3-debug"))["total_params"]
    )


def test_official_config_json_file(tmp_path):
    # An official-style config.json (model_type deepseek_v3, rope_scaling) given as a file path.
    values = DSV3Config().to_dict() | {"model_type": "deepseek_v3", "num_hidden_layers": 4}
    (tmp_path / "config.json").write_text(json.dumps(values, default=str))
    assert model_stats(load_config(tmp_path / "config.json"))["kv_cache_bytes_per_token"] == 4 * 576 * 2


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["info", str(tmp_path)])
    assert "without config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["info", "deepseek-v3-nope"])
    assert "deepseek-v3-671b" in capsys.readouterr().err  # lists what exists
