"""GPU experiment: load balancing on deepseek-v3-small (no MTP), three ways, same data, same budget each (--steps,
or --seconds of wall time).

- aux-free: router-bias update (gamma = 0.001) after every step, sequence-wise balance loss alpha = 1e-4 (the paper);
- aux loss: no bias update, the classic auxiliary loss over each micro-batch (aux_loss_scope="batch"), alpha = 0.001
  (the baseline of arXiv 2408.15664);
- none: neither.
Reports batch MaxVio (mean over layers, averaged over the last 50 training steps), global MaxVio (loads summed per
layer, then MaxVio averaged over layers) over the last 100 training batches and over 64 held-out sequences (the
corpus tail: other modules than training), the held-out main loss, the largest router bias per layer, and the batch
MaxVio every 10 steps. Data as in mtp_experiment.py.

    python benchmarks/balancing_experiment.py --tokens .data/stdlib_tokens.npy --seconds 50   # $OUT/balancing.json
    python benchmarks/balancing_experiment.py --tokens .data/stdlib_tokens.npy --steps 3000   # equal steps
    python benchmarks/balancing_experiment.py --tokens .data/stdlib_tokens.npy --steps 2000 --compile --settings none
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from modeling_deepseek_v3.training.balancing import max_violation, moe_layers
from mtp_experiment import SMALL, add_common_arguments, held_out_outputs, split_tokens, train_for

from modeling_deepseek_v3 import DSV3Config

# (gamma, alpha, aux_loss_scope)
SETTINGS = {"aux-free": (0.001, 1e-4, "sequence"), "aux loss": (0.0, 1e-3, "batch"), "none": (0.0, 0.0, "sequence")}


def run(name: str, gamma: float, alpha: float, scope: str, train_tokens, held, args) -> dict:
    config = DSV3Config.from_pretrained(SMALL, num_nextn_predict_layers=0, seq_aux_loss_alpha=alpha,
                                        bias_update_speed=gamma, aux_loss_scope=scope)  # fmt: skip
    batch_vio, recent_loads = [], []

    def record(step, out, seconds):
        batch_vio.append(max_violation(out.expert_load).mean().item())
        recent_loads.append(out.expert_load.detach().to(torch.int64))
        del recent_loads[:-100]

    model, step, seconds = train_for(config, train_tokens, args, record)
    # The paper's global MaxVio sums loads over a validation set drawn like the training data; the loads of the
    # last 100 training batches are that (819K tokens at B=16 x 512), the held-out tail of the corpus a shifted set.
    train_global = max_violation(torch.stack(recent_loads).sum(0)).mean().item()
    loads, loss, n_held = None, 0.0, 64
    for out in held_out_outputs(model, held, args, n_held):
        loss += out.lm_loss.item() / n_held
        loads = out.expert_load if loads is None else loads + out.expert_load
    biases = torch.stack([layer.gate.e_score_correction_bias for layer in moe_layers(model)])
    result = {"gamma": gamma, "alpha": alpha, "aux_loss_scope": scope, "steps": step, "seconds": round(seconds, 1),
              "held_out_lm_loss": loss, "batch_maxvio_last50": float(np.mean(batch_vio[-50:])),
              "global_maxvio_last100_train_batches": train_global,
              "global_maxvio_held_out": max_violation(loads).mean().item(),
              "held_out_maxvio_per_layer": [round(v, 3) for v in max_violation(loads).tolist()],
              "max_abs_bias_per_layer": [round(v, 3) for v in biases.abs().amax(-1).tolist()],
              "batch_maxvio_every_10_steps": [round(v, 4) for v in batch_vio[::10]]}  # fmt: skip
    print(name, json.dumps({k: v for k, v in result.items() if not k.startswith("batch_maxvio_every")}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    add_common_arguments(p)
    p.add_argument("--seconds", type=float, default=50)
    p.add_argument("--steps", type=int, help="train each setting for this many steps instead of --seconds")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--gamma", type=float, help="bias update speed of the aux-free setting (default: the paper's 0.001)")
    args = p.parse_args()
    if not args.tokens:
        p.error("--tokens PATH is required (build it with mtp_experiment.py --make-tokens PATH)")
    train_tokens, held = split_tokens(args.tokens)
    results = {"args": vars(args), "device": torch.cuda.get_device_name()}
    for name in args.settings:
        gamma, alpha, scope = SETTINGS[name]
        if name == "aux-free" and args.gamma is not None:
            gamma = args.gamma
        results[name] = run(name, gamma, alpha, scope, train_tokens, held, args)
        (Path(os.environ.get("OUT", "/tmp")) / "balancing.json").write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
