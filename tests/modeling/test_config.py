import json

import pytest
from transformers import AutoConfig, DeepseekV3Config

from modeling_deepseek_v3 import DSV3Config

# DeepSeek-V3's config.json as published (deepseek-ai/DeepSeek-V3), auto_map and fp8 quantization_config included.
OFFICIAL_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_defaults_are_the_671b_values():
    c = DSV3Config()
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank, c.num_nextn_predict_layers) == (512, 64, 1536, 1)
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 40
    assert (c.bias_update_speed, c.seq_aux_loss_alpha, c.mtp_loss_weight) == (0.001, 0.0001, 0.3)


def test_official_config_json_loads_as_is(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    c = DSV3Config.from_pretrained(tmp_path)
    assert c.rope_parameters == {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096,
    }  # fmt: skip
    assert c.quantization_config["weight_block_size"] == [128, 128]
    assert c.hidden_size == 7168 and c.num_nextn_predict_layers == 1 and c.topk_method == "noaux_tc"
    # Round trip through our own serialisation keeps every value.
    c.save_pretrained(tmp_path / "again")
    again = DSV3Config.from_pretrained(tmp_path / "again")
    assert again.rope_parameters == c.rope_parameters and again.to_diff_dict() == c.to_diff_dict()


def test_builtin_saved_config_loads(tmp_path):
    builtin = DeepseekV3Config(
        hidden_size=64, num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0, "original_max_position_embeddings": 64},
    )  # fmt: skip
    builtin.save_pretrained(tmp_path)
    c = DSV3Config.from_pretrained(tmp_path)
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["rope_theta"] == 5000.0
    assert c.qk_head_dim == builtin.qk_nope_head_dim + builtin.qk_rope_head_dim


def test_explicit_null_rope_scaling_means_plain_rope():
    assert DSV3Config(rope_scaling=None, rope_theta=500.0).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}


def test_auto_config_knows_dsv3(tmp_path):
    DSV3Config(hidden_size=64).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DSV3Config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),
        ({"topk_group": 9}, "topk_group"),
        ({"n_group": 8, "topk_group": 1, "n_routed_experts": 16, "num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_parameters"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8}}, "rope_parameters"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -4}, "kv_lora_rank"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"bias_update_speed": -0.1}, "bias_update_speed"),
        ({"moe_implementation": "magic"}, "moe_implementation"),
        ({"aux_loss_scope": "global"}, "aux_loss_scope"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "quantization_config"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"DSV3Config\.{field}="):
        DSV3Config(**overrides)


def test_q_lora_rank_none_is_valid():
    assert DSV3Config(q_lora_rank=None).q_lora_rank is None
