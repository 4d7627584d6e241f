"""GPU experiment: FP8 vs bf16 training of deepseek-v3-small on real text, same steps, same data, same init.

FP8 run: `linear_implementation="fp8"` (MLA projections, dense and shared MLPs) and `moe_implementation="fp8"`
(routed experts), i.e. the block-scaled e4m3 forward, dgrad and wgrad of kernels/; embedding, router, norms and
output head stay in bf16, as in the paper (section 3.3). bf16 run: the same model with torch linears and grouped_mm
experts. Both use the shared loop of mtp_experiment.py (AdamW, warmup, aux-loss-free bias update) with the same
seed, so both start from identical weights and see identical batches. The paper reports a relative loss error
below 0.25% between FP8 and BF16 training; we report the relative difference of the training loss (mean over the
last 50 steps) and of the held-out loss after training. Data as in mtp_experiment.py (--make-tokens).

    python benchmarks/fp8_training_experiment.py --tokens .data/stdlib_tokens.npy --steps 300   # $OUT/fp8_training.json
    python benchmarks/fp8_training_experiment.py --tokens .data/stdlib_tokens.npy --steps 300 --noise-seed 1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from mtp_experiment import SMALL, add_common_arguments, held_out_losses, split_tokens, train_for

from modeling_deepseek_v3 import DSV3Config

BACKENDS = {"bf16": dict(linear_implementation="torch", moe_implementation="grouped_mm"),
            "fp8": dict(linear_implementation="fp8", moe_implementation="fp8")}  # fmt: skip


def run(name: str, backend: str, train_tokens, held, args) -> dict:
    config = DSV3Config.from_pretrained(SMALL, num_nextn_predict_layers=1, **BACKENDS[backend])
    losses, times = [], []

    def record(step, out, seconds):
        losses.append(out.lm_loss.item())
        times.append(seconds)
        if step % 50 == 0:
            print(name, step, round(seconds, 1), losses[-1], flush=True)

    model, steps, seconds = train_for(config, train_tokens, args, record)
    result = {"steps": steps, "seconds": seconds, "tokens_per_s": steps * args.batch * args.seq / seconds,
              "lm_loss_per_step": losses, "train_lm_loss_last50": float(np.mean(losses[-50:])),
              **held_out_losses(model, held, args)}  # fmt: skip
    print(name, {k: v for k, v in result.items() if k != "lm_loss_per_step"}, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    add_common_arguments(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--noise-seed", type=int, help="also train bf16 from this init seed: the seed-to-seed spread")
    args = p.parse_args()
    if not args.tokens:
        p.error("--tokens PATH is required (build it with mtp_experiment.py --make-tokens PATH)")
    train_tokens, held = split_tokens(args.tokens)
    results = {"args": vars(args), "device": torch.cuda.get_device_name()}
    out_path = Path(os.environ.get("OUT", "/tmp")) / "fp8_training.json"
    for name in BACKENDS:
        results[name] = run(name, name, train_tokens, held, args)
        out_path.write_text(json.dumps(results))
        torch.cuda.empty_cache()
    if args.noise_seed is not None:
        seed, args.seed = args.seed, args.noise_seed
        results["bf16_other_seed"] = run(f"bf16 seed {args.noise_seed}", "bf16", train_tokens, held, args)
        args.seed = seed
    bf16, fp8 = results["bf16"], results["fp8"]
    summary = {
        "step0_loss": [bf16["lm_loss_per_step"][0], fp8["lm_loss_per_step"][0]],
        "train_rel_diff": fp8["train_lm_loss_last50"] / bf16["train_lm_loss_last50"] - 1,
        "held_out_rel_diff": fp8["held_out_lm_loss"] / bf16["held_out_lm_loss"] - 1,
        "per_step_rel_diff_last50": float(np.mean(np.array(fp8["lm_loss_per_step"][-50:]) / np.array(bf16["lm_loss_per_step"][-50:]) - 1)),
        "fp8_over_bf16_tokens_per_s": fp8["tokens_per_s"] / bf16["tokens_per_s"],
    }  # fmt: skip
    if "bf16_other_seed" in results:  # the same comparison between two bf16 runs: what noise alone gives
        other = results["bf16_other_seed"]
        summary["seed_spread_train_rel_diff"] = other["train_lm_loss_last50"] / bf16["train_lm_loss_last50"] - 1
        summary["seed_spread_held_out_rel_diff"] = other["held_out_lm_loss"] / bf16["held_out_lm_loss"] - 1
    results["summary"] = summary
    out_path.write_text(json.dumps(results))
    print("summary", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
