"""`dsv3 bench-generate`: new tokens/s of fast decoding (fast_decode.py) against plain generate(), random prompts.

dsv3 bench-generate --config deepseek-v3-small --batch 1 --prompt-length 512 --max-new-tokens 128
dsv3 bench-generate path/to/model --batch 16 --prompt-length 4096 --mla triton
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .fast_decode import fast_greedy_generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv3 bench-generate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", nargs="?", help="folder written by save_pretrained (or an official checkpoint)")
    p.add_argument("--config", help="hub_configs name or config folder: a RANDOMLY initialised model (speed only)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mla", default="default", choices=["default", "triton", "auto"],
                   help="decode attention: the Triton latent-cache kernel, or 'auto' (torch absorbed path)")  # fmt: skip
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--skip-plain", action="store_true", help="do not time model.generate() for comparison")
    p.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.config is None):
        p.error("give exactly one of MODEL_DIR or --config NAME")
    return args


def _timed(fn) -> tuple[torch.Tensor, float]:
    fn()  # warm-up: compilation, allocator, graph capture
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """`dsv3 bench-generate`: new tokens/s of fast_greedy_generate (and of plain generate), random prompts."""
    from .generate import load_model

    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model, description = load_model(args, device)
    model.eval()
    print(f"[dsv3 bench-generate] model: {description}", flush=True)
    ids = torch.randint(2, model.config.vocab_size, (args.batch, args.prompt_length), device=device)
    mask = torch.ones_like(ids)
    n = args.max_new_tokens
    mla = None if args.mla == "default" and device == "cpu" else args.mla
    fast, dt_fast = _timed(lambda: fast_greedy_generate(
        model, ids, mask, n, use_cuda_graph=not args.no_cuda_graph, eos_token_id=[], mla_implementation=mla))  # fmt: skip
    report = {"batch": args.batch, "prompt_length": args.prompt_length, "new_tokens": n,
              "fast_new_tokens_per_s": args.batch * (fast.shape[1] - args.prompt_length) / dt_fast}  # fmt: skip
    if not args.skip_plain:
        plain, dt_plain = _timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                        do_sample=False))  # fmt: skip
        report["plain_new_tokens_per_s"] = args.batch * (plain.shape[1] - args.prompt_length) / dt_plain
        report["speedup"] = report["fast_new_tokens_per_s"] / report["plain_new_tokens_per_s"]
        report["same_tokens"] = bool(torch.equal(plain, fast))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
