"""TRL post-training of the debug model on the CPU: SFT learns and touches every trainable parameter; GRPO, seeded,
raises the expected correctness reward on an easy verifiable task by a clear margin.

The debug model keeps the real 129,280-entry vocabulary because TRL tokenises with the real DeepSeek-V3 tokenizer.
A randomly initialised model almost never samples a digit (p ~ 10 / 129,280), so GRPO would see no reward at all:
SFT first teaches the format (one digit, every digit equally often for every prompt, so the right one has
probability ~0.1), then GRPO has to find which digit each prompt's reward picks out.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from modeling_deepseek_v3.training.grpo import build_grpo_trainer
from modeling_deepseek_v3.training.rewards import correctness_reward
from modeling_deepseek_v3.training.sft import build_sft_trainer
from modeling_deepseek_v3.training.tasks import arithmetic_dataset
from trl import GRPOConfig, SFTConfig

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

DEBUG = Path(__file__).resolve().parents[2] / "hub_configs" / "deepseek-v3-debug"
CPU = {"use_cpu": True, "bf16": False, "report_to": [], "save_strategy": "no", "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def task():
    return arithmetic_dataset(2, level="easy", seed=1, instruction=False)  # "What is a + b?" with a + b <= 9


@pytest.fixture(scope="module")
def sft_run(tokenizer, task, tmp_path_factory):
    torch.manual_seed(0)
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = Dataset.from_list([{"prompt": p, "completion": str(d)} for p in task["prompt"] for d in range(10)])
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), max_steps=15, per_device_train_batch_size=20,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=5, seed=0, **CPU)  # fmt: skip
    trainer = build_sft_trainer(model, data, args, tokenizer=tokenizer)
    trainer.train()
    return trainer, before


def expected_correctness(model, tokenizer, task) -> float:
    """Exact expected correctness reward of one sampled answer token (temperature 1), averaged over the prompts."""
    model.eval()
    probs = []
    with torch.no_grad():
        for prompt, answer in zip(task["prompt"], task["answer"], strict=True):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            p = model(input_ids=ids).logits[0, -1].softmax(-1)
            probs.append(p[tokenizer.convert_tokens_to_ids(answer)].item())
    return sum(probs) / len(probs)


def test_sft_lowers_loss_and_changes_every_trainable_parameter(sft_run):
    trainer, before = sft_run
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert logs[-1]["lm_loss"] < 0.5 * logs[0]["lm_loss"]
    assert all(h["mtp_loss"] > 0 for h in logs)  # the model's own objective: MTP trains too
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def test_grpo_raises_correctness_reward(sft_run, tokenizer, task, tmp_path):
    model = sft_run[0].model
    start = expected_correctness(model, tokenizer, task)
    assert 0.03 < start < 0.2  # about 1 in 10: the format is learnt, the answers are not
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=1, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=2,
                      seed=0, **CPU)  # fmt: skip
    trainer = build_grpo_trainer(model, task.select_columns(["prompt", "answer"]), args,
                                 reward_funcs=[correctness_reward], tokenizer=tokenizer)  # fmt: skip
    trainer.train()
    end = expected_correctness(trainer.model, tokenizer, task)
    assert end > start + 0.2, (start, end)
    rewards = [h["rewards/correctness_reward/mean"] for h in trainer.state.log_history if "reward" in h]
    assert rewards[-1] > rewards[0]
    assert any("moe/maxvio" in h for h in trainer.state.log_history)


def test_grpo_with_lora_generates_through_the_static_cache(sft_run, tokenizer, task, tmp_path, monkeypatch):
    """`cache_implementation="static"` in GRPOConfig reaches the model's generate() through PEFT's wrapper and runs
    fast_decode (static latent cache; a CUDA graph on GPUs) for every generation batch, sampling as TRL asks."""
    from modeling_deepseek_v3.training.lora import lora_config

    from modeling_deepseek_v3 import fast_decode

    calls = []
    real = fast_decode.fast_generate

    def spy(*args, **kwargs):
        calls.append(kwargs["choose"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_decode, "fast_generate", spy)
    model = copy.deepcopy(sft_run[0].model)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=2, learning_rate=1e-3, logging_steps=1, seed=0,
                      cache_implementation="static", **CPU)  # fmt: skip
    trainer = build_grpo_trainer(model, task.select_columns(["prompt", "answer"]), args,
                                 reward_funcs=[correctness_reward], tokenizer=tokenizer,
                                 peft_config=lora_config(model, r=4))  # fmt: skip
    trainer.train()
    assert len(calls) == 2 and all(choose is not fast_decode.greedy for choose in calls)  # sampled, every step
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "reward" in h]
    assert len(lengths) == 2 and all(1 <= n <= 2 for n in lengths)  # within max_completion_length; EOS may end one


def test_sft_then_grpo_commands(tmp_path):
    """`dsv3 sft` and `dsv3 grpo` end to end through their main(): a folder in, a folder out that the next command
    (and from_pretrained) loads, with the tokenizer beside it; a missing --model_name_or_path is a clear exit."""
    from modeling_deepseek_v3.training import grpo, sft

    torch.manual_seed(0)
    DSV3ForCausalLM(DSV3Config.from_pretrained(DEBUG)).save_pretrained(tmp_path / "base")
    common = ["--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--num_problems", "8"]
    assert sft.main(["--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / "sft"),
                     "--per_device_train_batch_size", "4", *common]) == 0  # fmt: skip
    assert (tmp_path / "sft" / "tokenizer.json").is_file()
    assert grpo.main(["--model_name_or_path", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "grpo"),
                      "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
                      *common]) == 0  # fmt: skip
    model = DSV3ForCausalLM.from_pretrained(tmp_path / "grpo")
    assert model.config.num_hidden_layers == DSV3Config.from_pretrained(DEBUG).num_hidden_layers
    for command in (sft, grpo):
        with pytest.raises(SystemExit, match="--model_name_or_path MODEL_DIR is required"):
            command.main(["--output_dir", str(tmp_path / "none")])
