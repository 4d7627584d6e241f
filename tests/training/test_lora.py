"""PEFT LoRA on DSV3: the documented targets (MLA, dense/shared MLPs, routed experts via target_parameters); only
adapter weights train under TRL; save/load round trip; merge_and_unload gives the adapter model's logits."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from modeling_deepseek_v3.training.lora import apply_lora, load_adapter, lora_config, merge_adapter
from modeling_deepseek_v3.training.sft import build_sft_trainer
from trl import SFTConfig

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"


def small_model(seed: int = 0) -> DSV3ForCausalLM:
    torch.manual_seed(seed)
    return DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG, vocab_size=512)).eval()  # no tokenizer involved


def perturbed_adapter(model):
    peft_model = apply_lora(model, lora_config(model, r=4, alpha=8))
    with torch.no_grad():  # LoRA starts as an exact no-op (B = 0): make it do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model.eval()


def test_targets_cover_mla_mlps_and_experts():
    model = perturbed_adapter(small_model())
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    for suffix in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                   "self_attn.o_proj", "layers.0.mlp.gate_proj", "mlp.shared_experts.down_proj", "mlp.experts"):  # fmt: skip
        assert any(n.endswith(suffix) or f"{suffix}." in n for n in adapted), suffix
    assert not any("gate.weight" in n or "lm_head" in n or "embed" in n for n in adapted)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_merge_equals_adapter_and_save_load_round_trip(tmp_path):
    model = perturbed_adapter(small_model())
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        base_logits = small_model()(input_ids=ids).logits
        adapter_logits = model(input_ids=ids).logits
        assert (adapter_logits - base_logits).abs().max() > 1e-3  # the experts' and projections' adapters act
        model.save_pretrained(tmp_path / "adapter")
        reloaded = load_adapter(small_model(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapter_logits, rtol=0, atol=0)
        merged = merge_adapter(model)
        assert type(merged) is DSV3ForCausalLM
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)
        merged.save_pretrained(tmp_path / "merged")  # official layout, loads as a plain model
        again = DSV3ForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(again(input_ids=ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)


def test_only_adapter_weights_train_under_trl(tmp_path):
    torch.manual_seed(0)
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"} for a in range(4) for b in range(2)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, bf16=False, report_to=[], save_strategy="no", gradient_checkpointing=True)  # fmt: skip
    trainer = build_sft_trainer(model, Dataset.from_list(rows), args, tokenizer=load_tokenizer(),
                                peft_config=lora_config(model, r=4, alpha=8))  # fmt: skip
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    assert lora_before and all("lora_" in n for n in lora_before)
    assert all(not torch.equal(trained[n], p) for n, p in lora_before.items() if "lora_B" in n)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.items()
              if "lora_" not in n}  # fmt: skip
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[n], base[n]) for n in base)


def test_targets_that_match_nothing_are_named():
    model = small_model()
    with pytest.raises(ValueError, match=r"match nothing.*'q_proj_typo'.*'mlp.experts.up_proj'"):
        apply_lora(model, lora_config(model, target_modules=["q_a_proj", "q_proj_typo"],
                                      target_parameters=["mlp.experts.up_proj"]))  # fmt: skip
    with pytest.raises(ValueError, match="lora_dropout=0"):
        lora_config(model, dropout=0.1)


@pytest.mark.parametrize("variant", ["lora", "dora", "disabled", "merged"])
def test_decoding_through_the_cache_keeps_the_adapters(variant):
    """Decoding with a cache takes MLA's absorbed path, which multiplies by kv_b_proj's matrix instead of calling the
    module: the adapter there (a default target) must count as it does in the full forward (it once dropped out of
    every decoded token: 1.26 relative error in the logits). LoRA: its matrix is the base weight plus the scaled B A;
    DoRA: no such sum, so the naive path runs; disabled or merged adapters: the base weight holds what the forward
    computes. Each cached step's logits equal the full recomputation's at that position."""
    from transformers.cache_utils import DynamicCache

    model = small_model()
    if variant == "dora":
        config = lora_config(model, r=4, alpha=8, experts=False)  # PEFT's parameter LoRA has no DoRA
        config.use_dora = True
        peft_model = apply_lora(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        peft_model.eval()
    else:
        peft_model = perturbed_adapter(model)
    if variant == "merged":
        peft_model = merge_adapter(peft_model)
    ids = torch.randint(0, 512, (2, 9))
    context = peft_model.disable_adapter() if variant == "disabled" else contextlib.nullcontext()
    with torch.no_grad(), context:
        full = peft_model(input_ids=ids).logits
        cache = DynamicCache()
        peft_model(input_ids=ids[:, :5], cache=cache, use_cache=True)
        for t in range(5, 9):
            step = peft_model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
            assert (step - full[:, t]).abs().max() <= 1e-4 * full[:, t].abs().max(), (variant, t)
