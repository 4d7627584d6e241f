"""`dsv3` console script: one subcommand per job, each a module with `main(argv)`.

    dsv3 info hub_configs/deepseek-v3-671b      parameters, activated parameters, MTP, cache bytes, FLOPs
    dsv3 generate MODEL_DIR --prompt "..."      text generation with the DeepSeek-V3 tokenizer
    dsv3 train [--config deepseek-v3-debug]     pretraining with Accelerate (the main job)
    dsv3 eval --model DIR --tasks ...           evaluation on local task files
    dsv3 publish MODEL_DIR OUT_DIR              Hub-ready folder (custom code, model card), optional push
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("modeling_deepseek_v3.info", "model size, activated parameters, KV-cache bytes and FLOPs per token"),
    "generate": ("modeling_deepseek_v3.generate", "generate text from a model folder"),
    "train": ("modeling_deepseek_v3.training.pretrain", "pretrain with Accelerate (aux-loss-free balancing, MTP)"),
    "sft": ("modeling_deepseek_v3.training.sft", "supervised fine-tuning with TRL's SFTTrainer (full or LoRA)"),
    "grpo": ("modeling_deepseek_v3.training.grpo", "GRPO with verifiable rewards (arithmetic task or GSM8K jsonl)"),
    "eval": ("modeling_deepseek_v3.eval.runner", "evaluate a model folder on local tasks (perplexity, MC, GSM8K, HumanEval)"),
    "publish": ("modeling_deepseek_v3.publish", "write (and optionally push) a Hub-ready folder with a model card"),
    "bench-generate": ("modeling_deepseek_v3.bench_generate", "new tokens/s of fast greedy decoding (static cache, CUDA graph)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: dsv3 COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
