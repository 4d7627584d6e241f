"""GPU experiment: train deepseek-v3-small with MTP on and off on real text, then measure MTP draft acceptance.

Data: the Python 3.11 standard library's source (PSF licence), tokenised with the DeepSeek-V3 tokenizer into a
uint32 .npy (8.2M tokens; 5% held out at the end). Both runs get the same data order and the same main model; the
MTP run also trains one MTP module (lambda = 0.3). With --steps both runs take that many steps: equal main-model
compute and tokens (the MTP module's own compute comes on top). With --seconds instead, equal wall time: the MTP
run then does fewer steps. The held-out main loss is reported with the step count of each run.
Router biases follow the aux-loss-free update (gamma = 0.001) after every step.

    python benchmarks/mtp_experiment.py --make-tokens .data/stdlib_tokens.npy            # on any machine (CPU, ~20 s)
    python benchmarks/mtp_experiment.py --tokens .data/stdlib_tokens.npy --seconds 110   # on the GPU; writes $OUT/mtp_experiment.json
    python benchmarks/mtp_experiment.py --tokens .data/stdlib_tokens.npy --steps 600 --skip-acceptance  # equal compute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from modeling_deepseek_v3.training.balancing import update_router_biases

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.speculative import mtp_generate

SMALL = Path(__file__).resolve().parents[1] / "hub_configs" / "deepseek-v3-small"


def make_tokens(path: str) -> None:
    """Tokenise the running Python's standard-library sources (no site-packages) into a uint32 .npy, one document
    per file: BOS, the file's tokens, EOS."""
    import glob
    import sysconfig

    from modeling_deepseek_v3.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(f"{root}/**/*.py", recursive=True) if "site-packages" not in f)
    texts = []
    for name in files:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    ids = []
    for doc in tokenizer(texts, add_special_tokens=False).input_ids:
        ids += [tokenizer.bos_token_id, *doc, tokenizer.eos_token_id]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array(ids, dtype=np.uint32))
    print(f"{len(texts)} files from {root}: {len(ids):,} tokens -> {path}")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every experiment on the token file shares (same defaults everywhere)."""
    p.add_argument("--tokens", help="uint32 .npy from --make-tokens")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (the data order is fixed)")
    p.add_argument("--compile", action="store_true", help="compile_layers(): regional torch.compile, faster steps")


def split_tokens(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, held-out tokens): the last 5% of the file is held out."""
    tokens = np.load(path)
    split = int(len(tokens) * 0.95)
    return tokens[:split], tokens[split:]


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        yield torch.from_numpy(np.stack([tokens[s : s + seq] for s in starts]).astype(np.int64)).cuda()


def train_for(config: DSV3Config, train_tokens, args, on_step=None) -> tuple[DSV3ForCausalLM, int, float]:
    """The experiments' shared loop: bf16 weights, AdamW with a 50-step warmup, grad clip 1.0, the aux-loss-free
    bias update (gamma = config.bias_update_speed) after each step, for args.steps steps when given (equal compute
    and data across runs), else for args.seconds of wall time (equal time).
    `on_step(step, out, seconds)` sees every step's outputs. Returns the model (eval mode), steps and seconds."""
    torch.manual_seed(getattr(args, "seed", 0))
    config._attn_implementation = "sdpa"
    model = DSV3ForCausalLM(config).cuda().to(torch.bfloat16).train()
    if getattr(args, "compile", False):
        model.compile_layers()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = batches(train_tokens, args.batch, args.seq, seed=1)
    max_steps = getattr(args, "steps", None)
    step, start = 0, time.perf_counter()
    while (step < max_steps) if max_steps else (time.perf_counter() - start < args.seconds):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)  # warmup, then constant (short run)
        ids = next(data)
        out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_biases(model, out.expert_load, config.bias_update_speed)
        if on_step is not None:
            on_step(step, out, time.perf_counter() - start)
        step += 1
    torch.cuda.synchronize()
    return model.eval(), step, time.perf_counter() - start


def train(depth: int, train_tokens, args, results: dict, name: str) -> DSV3ForCausalLM:
    config = DSV3Config.from_pretrained(SMALL, num_nextn_predict_layers=depth, mtp_loss_weight=0.3)
    log = []

    def record(step, out, seconds):
        if step % 50 == 0:
            log.append({"step": step, "s": round(seconds, 1), "lm": out.lm_loss.item(),
                        "mtp": None if out.mtp_loss is None else out.mtp_loss.item() / 0.3})  # fmt: skip
            print(name, log[-1], flush=True)

    model, step, elapsed = train_for(config, train_tokens, args, record)
    results[name] = {"steps": step, "tokens": step * args.batch * args.seq, "seconds": elapsed,
                     "tokens_per_s": step * args.batch * args.seq / elapsed, "log": log}  # fmt: skip
    return model


@torch.no_grad()
def held_out_outputs(model, held, args, sequences: int = 16):
    """The model's outputs (with loss and expert loads) on the first `sequences` held-out sequences of args.seq."""
    for i in range(sequences):
        ids = torch.from_numpy(held[i * args.seq : (i + 1) * args.seq].astype(np.int64))[None].cuda()
        yield model(ids, labels=ids, use_cache=False)


def held_out_losses(model, held, args) -> dict:
    lm, mtp, n = 0.0, 0.0, 0
    for out in held_out_outputs(model, held, args):
        lm += out.lm_loss.item()
        mtp += 0.0 if out.mtp_loss is None else out.mtp_loss.item() / 0.3
        n += 1
    return {"held_out_lm_loss": lm / n, "held_out_mtp_ce": mtp / n if model.config.num_nextn_predict_layers else None}


@torch.no_grad()
def acceptance(model, held, batch: int, prompt: int, new: int) -> dict:
    offsets = np.linspace(0, len(held) - prompt - 1, batch + 2).astype(int)[1:-1]  # spread over the held-out text
    ids = torch.from_numpy(np.stack([held[o : o + prompt] for o in offsets]).astype(np.int64)).cuda()
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    torch.cuda.synchronize()
    t_spec = time.perf_counter() - t0
    same = (spec.sequences[:, prompt:] == plain[:, prompt:]).all(-1).float().mean().item()
    return {"batch": batch, "acceptance_rate": spec.acceptance_rate, "mean_accepted_length": spec.mean_accepted_length,
            "plain_tokens_per_s": batch * new / t_plain, "mtp_tokens_per_s": batch * new / t_spec,
            "speedup": t_plain / t_spec, "rows_identical_to_plain": same}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--make-tokens", metavar="PATH", help="build the token file and exit")
    add_common_arguments(p)
    p.add_argument("--seconds", type=float, default=110)
    p.add_argument("--steps", type=int, help="train each run for this many steps instead of --seconds")
    p.add_argument("--skip-acceptance", action="store_true", help="skip the speculative-decoding measurement")
    args = p.parse_args()
    if args.make_tokens:
        return make_tokens(args.make_tokens)
    if not args.tokens:
        p.error("--tokens PATH is required (build it with --make-tokens PATH)")
    train_tokens, held = split_tokens(args.tokens)
    counts = np.bincount(train_tokens, minlength=129280).astype(np.float64)
    probs = counts / counts.sum()
    held_p = np.maximum(probs[held], 1e-12)
    results = {"args": vars(args), "train_tokens": len(train_tokens), "held_out_tokens": len(held),
               "unigram_held_out_ce": float(-np.log(held_p).mean()), "device": torch.cuda.get_device_name()}  # fmt: skip
    out_path = Path(os.environ.get("OUT", "/tmp")) / (
        "mtp_experiment_steps.json" if args.steps else "mtp_experiment.json"
    )

    def save():
        out_path.write_text(json.dumps(results, indent=1))

    model = train(1, train_tokens, args, results, "mtp_on")
    results["mtp_on"].update(held_out_losses(model, held, args))
    save()
    for batch in () if args.skip_acceptance else (1, 16):
        results[f"acceptance_bs{batch}"] = acceptance(model, held, batch, prompt=256, new=64)
        print(results[f"acceptance_bs{batch}"], flush=True)
        save()
    del model
    torch.cuda.empty_cache()
    model = train(0, train_tokens, args, results, "mtp_off")
    results["mtp_off"].update(held_out_losses(model, held, args))
    save()
    print(json.dumps({k: v for k, v in results.items() if k not in ("mtp_on", "mtp_off")}), flush=True)
    for k in ("mtp_on", "mtp_off"):
        print(k, {a: b for a, b in results[k].items() if a != "log"}, flush=True)
    print("unigram", results["unigram_held_out_ce"], "ln(vocab)", math.log(129280))


if __name__ == "__main__":
    main()
