"""Oracle 1: transformers' built-in DeepseekV3ForCausalLM. Its checkpoints load into ours with identical logits,
and ours (MTP aside) load into it."""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from modeling_deepseek_v3 import DSV3ForCausalLM

# fp32, same weights, same op order up to summation order inside matmuls: differences are rounding only.
FP32_ATOL = 1e-5


def builtin_config(cfg) -> DeepseekV3Config:
    return DeepseekV3Config(
        **{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
            "n_shared_experts", "first_k_dense_replace", "max_position_embeddings", "routed_scaling_factor",
            "rms_norm_eps", "norm_topk_prob",
        )},
        rope_parameters=dict(cfg.rope_parameters),
        rope_interleave=True,
    )  # fmt: skip


@pytest.fixture
def builtin_checkpoint(tiny_config, tmp_path):
    """A random built-in model with YaRN, a nonzero correction bias and group-limited routing, saved to disk."""
    cfg = tiny_config(num_nextn_predict_layers=0)
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.topk_group < cfg.n_group
    builtin = DeepseekV3ForCausalLM(builtin_config(cfg)).eval()
    with torch.no_grad():
        for name, buf in builtin.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
        for name, p in builtin.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # wide router logits: group limits bind on many tokens
    builtin.save_pretrained(tmp_path)
    return builtin, tmp_path


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_builtin_checkpoint_gives_identical_logits(builtin_checkpoint, attn):
    builtin, folder = builtin_checkpoint
    ours = DSV3ForCausalLM.from_pretrained(folder, num_nextn_predict_layers=0, attn_implementation=attn)
    ids = torch.randint(0, ours.config.vocab_size, (3, 13))
    with torch.no_grad():
        expected = builtin(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max() <= FP32_ATOL

    # The routing really was group-limited and bias-corrected: compare the chosen experts against an
    # unrestricted top-k on the same scores.
    gate = ours.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.abs().min() > 0
    h = torch.randn(200, ours.config.hidden_size)
    _, _, idx = gate(h)
    unrestricted = (torch.sigmoid(h @ gate.weight.T) + gate.e_score_correction_bias).topk(gate.top_k, dim=-1)[1]
    assert not torch.equal(idx.sort(-1)[0], unrestricted.sort(-1)[0])
    groups_used = (idx // (gate.n_routed_experts // gate.n_group)).sort(-1)[0]
    assert all(len(set(row.tolist())) <= gate.topk_group for row in groups_used)


def test_builtin_checkpoint_needs_explicit_no_mtp(builtin_checkpoint):
    _, folder = builtin_checkpoint  # saved with num_nextn_predict_layers=1 in config.json but no MTP weights
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        DSV3ForCausalLM.from_pretrained(folder)


def test_our_checkpoint_loads_into_builtin(tiny_config, tmp_path):
    ours = DSV3ForCausalLM(tiny_config(num_nextn_predict_layers=0)).eval()
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    ours.save_pretrained(tmp_path)
    builtin = DeepseekV3ForCausalLM.from_pretrained(tmp_path, config=builtin_config(ours.config)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert (builtin(ids).logits - ours(ids).logits).abs().max() <= FP32_ATOL
