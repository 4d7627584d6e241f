"""GPU experiment: load balancing on deepseek-v3-small (no MTP), three ways, same data, same budget each (--steps,
or --seconds of wall time).

- aux-free: router-bias update (gamma = 0.001) after every step, sequence-wise balance loss alpha = 1e-4 (the paper);
- aux loss: no bias update, the classic auxiliary loss over each micro-batch (aux_loss_scope="batch"), alpha = 0.001
  (the baseline of arXiv 2408.15664);
- none: neither.
Reports batch MaxVio (mean over layers, averaged over the last 50 training steps), global MaxVio (loads summed over
a held-out set, per layer, then averaged) and the held-out main loss. Data as in mtp_experiment.py.

    python benchmarks/balancing_experiment.py --tokens .data/stdlib_tokens.npy --seconds 50   # $OUT/balancing.json
    python benchmarks/balancing_experiment.py --tokens .data/stdlib_tokens.npy --steps 3000   # equal steps
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from modeling_deepseek_v3.training.balancing import max_violation
from mtp_experiment import SMALL, add_common_arguments, split_tokens, train_for

from modeling_deepseek_v3 import DSV3Config

# (gamma, alpha, aux_loss_scope)
SETTINGS = {"aux-free": (0.001, 1e-4, "sequence"), "aux loss": (0.0, 1e-3, "batch"), "none": (0.0, 0.0, "sequence")}


def run(name: str, gamma: float, alpha: float, scope: str, train_tokens, held, args) -> dict:
    config = DSV3Config.from_pretrained(SMALL, num_nextn_predict_layers=0, seq_aux_loss_alpha=alpha,
                                        bias_update_speed=gamma, aux_loss_scope=scope)  # fmt: skip
    batch_vio = []
    model, step, _ = train_for(
        config, train_tokens, args, lambda step, out, seconds: batch_vio.append(max_violation(out.expert_load).mean().item())
    )
    loads, loss = None, 0.0
    with torch.no_grad():
        for i in range(16):
            ids = torch.from_numpy(held[i * args.seq : (i + 1) * args.seq].astype(np.int64))[None].cuda()
            out = model(ids, labels=ids)
            loss += out.lm_loss.item() / 16
            loads = out.expert_load if loads is None else loads + out.expert_load
    result = {"gamma": gamma, "alpha": alpha, "aux_loss_scope": scope, "steps": step, "held_out_lm_loss": loss,
              "batch_maxvio_last50": float(np.mean(batch_vio[-50:])),
              "global_maxvio_held_out": max_violation(loads).mean().item(),
              "batch_maxvio_every_10_steps": [round(v, 4) for v in batch_vio[::10]]}  # fmt: skip
    print(name, json.dumps({k: v for k, v in result.items() if not k.startswith("batch_maxvio_every")}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    add_common_arguments(p)
    p.add_argument("--seconds", type=float, default=50)
    p.add_argument("--steps", type=int, help="train each setting for this many steps instead of --seconds")
    args = p.parse_args()
    if not args.tokens:
        p.error("--tokens PATH is required (build it with mtp_experiment.py --make-tokens PATH)")
    train_tokens, held = split_tokens(args.tokens)
    results = {"args": vars(args), "device": torch.cuda.get_device_name()}
    for name, (gamma, alpha, scope) in SETTINGS.items():
        results[name] = run(name, gamma, alpha, scope, train_tokens, held, args)
        (Path(os.environ.get("OUT", "/tmp")) / "balancing.json").write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
