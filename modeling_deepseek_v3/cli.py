"""`dsv3` console script: one subcommand per job, each a module with `main(argv)`.

    dsv3 info hub_configs/deepseek-v3-671b      parameters, activated parameters, MTP, cache bytes, FLOPs
    dsv3 generate MODEL_DIR --prompt "..."      text generation with the DeepSeek-V3 tokenizer
    dsv3 train [--config deepseek-v3-debug]     pretraining with Accelerate (the main job)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("modeling_deepseek_v3.info", "model size, activated parameters, KV-cache bytes and FLOPs per token"),
    "generate": ("modeling_deepseek_v3.generate", "generate text from a model folder"),
    "train": ("modeling_deepseek_v3.training.pretrain", "pretrain with Accelerate (aux-loss-free balancing, MTP)"),
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
