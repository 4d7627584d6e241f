"""Supervised fine-tuning of a DeepSeek-V3 model folder with TRL's SFTTrainer (`dsv3 sft`).

    # CPU demo: pretrain the debug model briefly, then fine-tune it on the shipped arithmetic problems
    dsv3 train --max-steps 20 --output-dir runs/pre
    dsv3 sft --model_name_or_path runs/pre/final --dataset arithmetic --max_steps 20 --output_dir runs/sft
    # your data: a local .jsonl/.json/.parquet with `messages` (chat), `prompt` + `completion`, or `text`
    dsv3 sft --model_name_or_path MODEL_DIR --dataset data/chat.jsonl --learning_rate 2e-5 --max_length 4096 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --output_dir runs/sft
    # LoRA on MLA, dense/shared MLPs and routed experts (training/lora.py); saves only the adapter
    dsv3 sft --model_name_or_path MODEL_DIR --dataset data/chat.jsonl --use_peft --lora_r 16 --output_dir runs/lora
    # resume from the latest TRL checkpoint in output_dir (or give a checkpoint-N folder)
    dsv3 sft ... --resume_from_checkpoint last
    # several GPUs
    accelerate launch --config_file training/accelerate_configs/ddp.yaml -m modeling_deepseek_v3.training.sft ...

Arguments: `ModelArguments` below, then every `trl.SFTConfig` field. The model is always built as DSV3ForCausalLM
by this package's loader (official folders with model_type deepseek_v3 included), never transformers' built-in
DeepseekV3. Precision: bf16 weights and autocast on a GPU, fp32 on the CPU (where TRL's bf16=True default is
turned off unless --bf16 is given). The objective is the model's own loss: next-token CE + (lambda/D) MTP CE +
alpha sequence-balance, each normalised like the Trainer's loss; lm_loss, mtp_loss and aux_loss are logged apart.
TRL's fused LM head would compute the CE alone and skip MTP. The aux-loss-free bias update runs after each
optimizer step (training/callbacks.py; --moe_balance False turns it off).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer, TrlParser

from modeling_deepseek_v3 import DSV3ForCausalLM, DSV3PreTrainedModel
from modeling_deepseek_v3.checkpoint import load_official_state_dict
from modeling_deepseek_v3.tokenizer import load_tokenizer

from .balancing import keep_routers_fp32_under_fsdp2
from .callbacks import MoEBalanceCallback
from .lora import check_targets, lora_config
from .tasks import arithmetic_dataset


@dataclass
class ModelArguments:
    """Model, adapter and balancing options shared by `dsv3 sft` and `dsv3 grpo`."""

    model_name_or_path: str = field(default=None, metadata={"help": "a DSV3 / DeepSeek-V3 model folder"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32"})
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter (training/lora.py) instead"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_experts: bool = field(default=True, metadata={"help": "also adapt the routed experts (target_parameters)"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "default: MLA + dense/shared MLP"})
    moe_balance: bool = field(default=True, metadata={"help": "aux-loss-free router-bias update after each step"})
    bias_update_gamma: float = field(default=1e-3, metadata={"help": "bias step per optimizer step (paper: 1e-3)"})
    log_expert_load: bool = field(default=False, metadata={"help": "log every expert's load share, per layer"})


@dataclass
class SFTScriptArguments(ModelArguments):
    dataset: str = field(default="arithmetic", metadata={"help": "'arithmetic' (shipped) or a local data file"})
    num_problems: int = field(default=2000, metadata={"help": "arithmetic problems to generate"})
    task_level: str = field(default="medium", metadata={"help": "arithmetic level: easy, medium or hard"})


# ------------------------------------------------------------------------------------------ shared with grpo.py
def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, dtype)


def load_model(model: str | PreTrainedModel, dtype: str = "auto") -> PreTrainedModel:
    """A model object as it is, or a folder loaded as DSV3ForCausalLM (bf16 on GPU, fp32 on CPU by default)."""
    if not isinstance(model, str):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(base, DSV3PreTrainedModel):
            raise TypeError(f"expected a DSV3 model (modeling_deepseek_v3), got {type(base).__name__}")
        return model
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder not found: {model!r} (the Hub is not used; give a local folder)")
    return DSV3ForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype))


def device_defaults(argv: list[str]) -> list[str]:
    """TRL defaults to bf16=True, which fails without a GPU: there, run fp32 on the CPU unless --bf16 is given."""
    if torch.cuda.is_available():
        return argv
    given = {a.split("=", 1)[0] for a in argv}
    return (
        argv
        + (["--use_cpu", "True"] if "--use_cpu" not in given else [])
        + (["--bf16", "False"] if "--bf16" not in given else [])
    )


def peft_config_for(model: PreTrainedModel, margs: ModelArguments):
    if not margs.use_peft:
        return None
    config = lora_config(model, r=margs.lora_r, alpha=margs.lora_alpha, target_modules=margs.lora_target_modules,
                         experts=margs.lora_experts)  # fmt: skip
    check_targets(model, config)
    return config


def check_length(model: PreTrainedModel, tokens: int, what: str) -> None:
    limit = model.config.max_position_embeddings
    if tokens > limit:
        raise ValueError(f"{what} = {tokens} tokens exceeds the model's max_position_embeddings = {limit}")


def parse_command(name: str, script_class, config_class, argv: list[str] | None):
    """(script arguments, trainer config) of `dsv3 {name}` (TrlParser, with the device defaults); the model is required."""
    argv = sys.argv[1:] if argv is None else argv
    sargs, args = TrlParser((script_class, config_class)).parse_args_and_config(args=device_defaults(argv))
    if sargs.model_name_or_path is None:
        raise SystemExit(f"dsv3 {name}: --model_name_or_path MODEL_DIR is required")
    return sargs, args


def train_and_save(trainer, args) -> int:
    """Train (resuming where --resume_from_checkpoint says), then save the model and tokenizer to output_dir."""
    trainer.train(resume_from_checkpoint=resume_path(args))
    trainer.save_model(args.output_dir)
    trainer.processing_class.save_pretrained(args.output_dir)
    return 0


def resume_path(args) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, or 'last' for the newest one in output_dir."""
    if args.resume_from_checkpoint in (None, "", "False", "false"):
        return None
    if args.resume_from_checkpoint in ("last", "True", "true"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"no checkpoint-N folder to resume from in {args.output_dir}")
        return last
    return args.resume_from_checkpoint


class DSV3TrainerMixin:
    """What the TRL trainers need for a DSV3 model. Resume a TRL checkpoint of a full model: its save_pretrained
    writes the official key layout (one tensor per expert, MTP as model.layers.{L}), which Trainer's plain
    load_state_dict would silently skip. Under FSDP2 with mixed precision, keep each router an fp32 unit, as
    `dsv3 train` does (the Trainer's prepare() comes later and leaves those units alone)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        keep_routers_fp32_under_fsdp2(self.accelerator, self.model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        if isinstance(target, DSV3PreTrainedModel) and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            load_official_state_dict(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


# ------------------------------------------------------------------------------------------------------- SFT
class DSV3SFTTrainer(DSV3TrainerMixin, SFTTrainer):
    """SFTTrainer whose objective is the model's own loss (lm + MTP + balance), not TRL's fused CE alone."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        # With num_items_in_batch each micro-batch holds its share of the step's mean; scale back for the logs.
        share = self.current_gradient_accumulation_steps if num_items_in_batch is not None and mode == "train" else 1
        for key in ("lm_loss", "mtp_loss", "aux_loss"):
            value = getattr(outputs, key, None)
            if value is not None:
                value = self.accelerator.gather_for_metrics(value.detach()).mean().item()
                self._metrics[mode][key].append(value * share)
        return (loss, outputs) if return_outputs else loss


def check_sft_dataset(dataset: Dataset, text_field: str = "text") -> None:
    columns = dataset.column_names
    if "messages" in columns or {"prompt", "completion"} <= set(columns) or text_field in columns:
        return
    raise ValueError(
        f"SFT data needs a 'messages' column (chat), 'prompt' and 'completion' columns, or a '{text_field}' "
        f"column (plain text); found {columns}"
    )


def load_sft_dataset(sargs: SFTScriptArguments) -> Dataset:
    if sargs.dataset == "arithmetic":
        return arithmetic_dataset(sargs.num_problems, level=sargs.task_level).select_columns(["prompt", "completion"])
    if not os.path.isfile(sargs.dataset):
        raise FileNotFoundError(f"dataset file not found: {sargs.dataset!r} (or use --dataset arithmetic)")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
        os.path.splitext(sargs.dataset)[1]
    )
    if kind is None:
        raise ValueError(f"unsupported dataset file type: {sargs.dataset!r} (use .jsonl, .json, .parquet or .csv)")
    return load_dataset(kind, data_files=sargs.dataset, split="train")


def build_sft_trainer(
    model: str | PreTrainedModel,
    train_dataset: Dataset,
    args: SFTConfig,
    tokenizer=None,
    peft_config=None,
    moe_balance: bool = True,
    gamma: float = 1e-3,
    log_expert_load: bool = False,
    dtype: str = "auto",
) -> DSV3SFTTrainer:
    """The SFT trainer with the MoE balance callback attached; `model` is a folder path or a model object."""
    check_sft_dataset(train_dataset, args.dataset_text_field)
    if args.padding_free:
        raise ValueError("padding_free=True is not supported: DSV3 attention needs an attention mask for padding")
    model = load_model(model, dtype)
    if args.max_length is not None:
        check_length(model, args.max_length, "max_length")
    if peft_config is not None:
        check_targets(model, peft_config)
    if tokenizer is None:
        tokenizer = load_tokenizer(getattr(model.config, "_name_or_path", None) or None)
    trainer = DSV3SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                             peft_config=peft_config)  # fmt: skip
    MoEBalanceCallback.attach(trainer, gamma=gamma, update_biases=moe_balance, log_expert_load=log_expert_load)
    return trainer


def main(argv: list[str] | None = None) -> int:
    sargs, args = parse_command("sft", SFTScriptArguments, SFTConfig, argv)
    model = load_model(sargs.model_name_or_path, sargs.dtype)
    trainer = build_sft_trainer(
        model, load_sft_dataset(sargs), args, tokenizer=load_tokenizer(sargs.model_name_or_path),
        peft_config=peft_config_for(model, sargs), moe_balance=sargs.moe_balance, gamma=sargs.bias_update_gamma,
        log_expert_load=sargs.log_expert_load,
    )  # fmt: skip
    return train_and_save(trainer, args)


if __name__ == "__main__":
    sys.exit(main())
