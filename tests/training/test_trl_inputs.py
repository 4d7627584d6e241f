"""`dsv3 sft` / `dsv3 grpo` from a model folder (always the DSV3 class, reference model included), exact resume from a
TRL checkpoint, and bad input that must fail with an error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from modeling_deepseek_v3.training.grpo import build_grpo_trainer
from modeling_deepseek_v3.training.sft import build_sft_trainer
from modeling_deepseek_v3.training.tasks import arithmetic_dataset, load_gsm8k_jsonl
from trl import GRPOConfig, SFTConfig

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.cli import main as dsv3
from modeling_deepseek_v3.tokenizer import load_tokenizer

DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"
CPU = {"use_cpu": True, "bf16": False, "report_to": [], "save_strategy": "no", "gradient_checkpointing": False}
CLI_CPU = ["--report_to", "none", "--gradient_checkpointing", "False", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG)).save_pretrained(folder)
    return str(folder)


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    values = {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 3,
              **CPU, **overrides}  # fmt: skip
    return GRPOConfig(output_dir=str(tmp_path), **values)


def test_sft_cli_from_folder_and_exact_resume(model_dir, tmp_path):
    out = tmp_path / "sft"
    argv = ["sft", "--model_name_or_path", model_dir, "--dataset", "arithmetic", "--num_problems", "16",
            "--per_device_train_batch_size", "4", "--output_dir", str(out), "--save_steps", "2", *CLI_CPU]  # fmt: skip
    assert dsv3([*argv, "--max_steps", "2"]) == 0
    trained = DSV3ForCausalLM.from_pretrained(out)  # final model, official layout
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DSV3ForCausalLM"]
    # The checkpoint's weights come back exactly (Trainer's own loader would skip the experts and the MTP layer).
    fresh = DSV3ForCausalLM.from_pretrained(model_dir)
    trainer = build_sft_trainer(fresh, arithmetic_dataset(4).select_columns(["prompt", "completion"]),
                                SFTConfig(output_dir=str(out), **CPU), tokenizer=load_tokenizer())  # fmt: skip
    trainer._load_from_checkpoint(str(out / "checkpoint-2"))
    state = trained.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in fresh.state_dict().items())
    assert dsv3([*argv, "--max_steps", "3", "--resume_from_checkpoint", "last"]) == 0
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


def test_folder_path_builds_dsv3_policy_and_reference(model_dir, tokenizer, tmp_path):
    data = arithmetic_dataset(4, level="easy").select_columns(["prompt", "answer"])
    trainer = build_grpo_trainer(model_dir, data, grpo_args(tmp_path, beta=0.04), tokenizer=tokenizer)
    assert type(trainer.model) is DSV3ForCausalLM
    assert type(trainer.accelerator.unwrap_model(trainer.ref_model)) is DSV3ForCausalLM
    trainer.train()
    assert any("kl" in h for h in trainer.state.log_history)
    sft = build_sft_trainer(model_dir, arithmetic_dataset(4).select_columns(["prompt", "completion"]),
                            SFTConfig(output_dir=str(tmp_path), **CPU), tokenizer=tokenizer)  # fmt: skip
    assert type(sft.model) is DSV3ForCausalLM


def test_dataset_without_expected_columns(model_dir, tokenizer, tmp_path):
    bad = Dataset.from_list([{"question": "What is 1 + 1?", "solution": "2"}])
    with pytest.raises(ValueError, match=r"'messages'.*'prompt' and 'completion'.*found \['question', 'solution'\]"):
        build_sft_trainer(model_dir, bad, SFTConfig(output_dir=str(tmp_path), **CPU), tokenizer=tokenizer)
    with pytest.raises(
        ValueError, match=r"GRPO needs the dataset columns \['prompt', 'answer'\]; missing \['answer'\]"
    ):
        build_grpo_trainer(model_dir, bad.rename_column("question", "prompt"), grpo_args(tmp_path), tokenizer=tokenizer)
    jsonl = tmp_path / "gsm8k.jsonl"
    jsonl.write_text(json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k.jsonl:2: .*missing \['question', 'answer'\]"):
        load_gsm8k_jsonl(jsonl)


def test_reward_function_that_raises_is_named(model_dir, tokenizer, tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("score")

    data = arithmetic_dataset(4, level="easy").select_columns(["prompt", "answer"])
    trainer = build_grpo_trainer(
        model_dir, data, grpo_args(tmp_path), reward_funcs=[broken_reward], tokenizer=tokenizer
    )
    with pytest.raises(RuntimeError, match="reward function 'broken_reward' raised KeyError"):
        trainer.train()


def test_lengths_beyond_max_position_embeddings(model_dir, tokenizer, tmp_path):
    data = arithmetic_dataset(4, level="easy").select_columns(["prompt", "answer"])
    with pytest.raises(
        ValueError, match=r"max_completion_length \(4096\) = \d+ tokens exceeds .*max_position_embeddings = 2048"
    ):
        build_grpo_trainer(model_dir, data, grpo_args(tmp_path, max_completion_length=4096), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_length = 4096 tokens exceeds the model's max_position_embeddings = 2048"):
        build_sft_trainer(model_dir, arithmetic_dataset(4).select_columns(["prompt", "completion"]),
                          SFTConfig(output_dir=str(tmp_path), max_length=4096, **CPU), tokenizer=tokenizer)  # fmt: skip


def test_trl_trainers_keep_routers_fp32_under_fsdp2(monkeypatch):
    """dsv3 sft / grpo: once the Trainer has made its accelerator, and before it prepares the model, the routers get
    their fp32 FSDP2 units, as in `dsv3 train` (the decision itself: test_balancing.py)."""
    import transformers
    from modeling_deepseek_v3.training import sft
    from modeling_deepseek_v3.training.grpo import DSV3GRPOTrainer
    from modeling_deepseek_v3.training.sft import DSV3SFTTrainer

    seen = []
    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess",
                        lambda self: setattr(self, "accelerator", "the trainer's accelerator"))  # fmt: skip
    monkeypatch.setattr(
        sft, "keep_routers_fp32_under_fsdp2", lambda accelerator, model: seen.append((accelerator, model))
    )
    for cls in (DSV3SFTTrainer, DSV3GRPOTrainer):
        trainer = object.__new__(cls)  # only the hook under test: no model loading, no datasets
        trainer.model = cls.__name__
        trainer.create_accelerator_and_postprocess()
    assert seen == [("the trainer's accelerator", "DSV3SFTTrainer"), ("the trainer's accelerator", "DSV3GRPOTrainer")]
