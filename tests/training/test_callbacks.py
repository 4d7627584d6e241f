"""MoEBalanceCallback under TRL: biases move with it on and stay put with it off; loads are counted once per token
even with gradient checkpointing (which re-runs every decoder layer in the backward); MaxVio reaches the logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from modeling_deepseek_v3.training.balancing import moe_layers
from modeling_deepseek_v3.training.callbacks import MoEBalanceCallback
from modeling_deepseek_v3.training.sft import build_sft_trainer
from trl import SFTConfig

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def run_sft(tokenizer, tmp_path, moe_balance: bool, gradient_checkpointing: bool = False):
    torch.manual_seed(0)
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG))
    rows = [{"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"} for a in range(4) for b in range(2)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                     gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    trainer = build_sft_trainer(model, Dataset.from_list(rows), args, tokenizer=tokenizer, moe_balance=moe_balance,
                                gamma=0.01)  # fmt: skip
    before = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    trainer.train()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MoEBalanceCallback))
    return trainer, callback, before


def test_biases_move_with_the_callback_on(tokenizer, tmp_path):
    trainer, callback, before = run_sft(tokenizer, tmp_path, moe_balance=True, gradient_checkpointing=True)
    after = [m.gate.e_score_correction_bias for m in moe_layers(trainer.model)]
    for b0, b1 in zip(before, after, strict=True):
        step = (b1 - b0).abs()
        assert step.max() > 0
        # two optimizer steps of +-gamma (or 0) each: every change is a multiple of gamma = 0.01, at most 2 gamma
        assert torch.allclose(step / 0.01, (step / 0.01).round(), atol=1e-4) and step.max() <= 0.02 + 1e-6
        assert b1.dtype == torch.float32
    # Loads counted exactly once per real token, gradient checkpointing notwithstanding: K choices per token in
    # each main layer, K per token that has a next real token in the MTP layer.
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    K = trainer.model.config.num_experts_per_tok
    totals = callback.tracker.total_loads_LE.sum(-1)
    assert totals[:-1].tolist() == [K * sum(lengths)] * (len(totals) - 1)
    assert totals[-1].item() == K * sum(n - 1 for n in lengths)
    logged = [h for h in trainer.state.log_history if "moe/maxvio" in h]
    assert len(logged) == 2 and all(f"moe/layer{i}/maxvio" in logged[0] for i in callback.layer_ids)
    assert callback.layer_ids == [1, 2, 3]  # layer 0 is dense; 3 is the MTP layer


def test_biases_stay_put_with_the_callback_off(tokenizer, tmp_path):
    trainer, callback, before = run_sft(tokenizer, tmp_path, moe_balance=False)
    after = [m.gate.e_score_correction_bias for m in moe_layers(trainer.model)]
    assert all(torch.equal(b0, b1) for b0, b1 in zip(before, after, strict=True))
    assert any("moe/maxvio" in h for h in trainer.state.log_history)  # still logged
    assert callback.tracker.total_loads_LE.sum() > 0


def test_generation_does_not_count(tokenizer):
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG, vocab_size=512))
    callback = MoEBalanceCallback()
    callback.register(model)
    model.train()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 5)))
    assert callback.tracker.step_loads_LE.sum() == 0
    model(input_ids=torch.randint(0, 512, (2, 5)))
    assert callback.tracker.step_loads_LE[0].sum() == 2 * 5 * model.config.num_experts_per_tok
