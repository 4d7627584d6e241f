"""One train step's loss and gradients with the FP8 kernels vs bf16, same weights, same batch (issues 3 and 4).

bench_model_gpu.py's shape (vocab 32000, no MTP, std-0.02 weights), B=8, S=2048, random tokens. Three comparisons
against the bf16 model's loss and gradients, per parameter group (relative Frobenius error, cosine similarity):
  fp8, same routing   the FP8 model (the bf16 state dict loaded), each router's expert choice replaced by the
                      bf16 model's (its weights still computed from the FP8 model's own logits): FP8 numerics alone
  fp8                 the FP8 model choosing its own experts
  bf16, perturbed     control: the bf16 model with every weight multiplied by (1 + 2^-9 noise), below bf16's own
                      rounding step: how far a change this small moves the step once routing may flip
e4m3 keeps 3 mantissa bits (~2-4% relative noise per rounded operand), so the first row should show errors of a
few percent; the last two show what a flipped top-k choice does to a randomly initialised MoE.

    PYTHONUNBUFFERED=1 python3 benchmarks/fp8_grad_agreement.py
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from bench_model_gpu import build

GROUPS = ("experts.gate_up", "experts.down", "shared_experts", "self_attn", "mlp.gate_proj", "mlp.up_proj",
          "mlp.down_proj", "gate.weight", "lm_head", "embed_tokens", "norm")  # fmt: skip


def step(model, ids, routing: dict | None = None, record: dict | None = None):
    """Loss and fp32 gradients of one forward+backward; routers' expert choices recorded into `record` or replaced
    by `routing` (module name -> top-k indices)."""
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ != "DSV3TopkRouter":
            continue
        if record is not None:
            hooks.append(module.register_forward_hook(lambda m, a, out, name=name: record.__setitem__(name, out[2])))
        if routing is not None:

            def replace(m, args, out, name=name):
                logits, idx = out[0], routing[name]
                w = logits.sigmoid().gather(1, idx)
                if m.norm_topk_prob:
                    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
                return logits, w * m.routed_scaling_factor, idx

            hooks.append(module.register_forward_hook(replace))
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def compare(loss, grads, ref_loss, ref_grads) -> dict:
    stats = defaultdict(lambda: [0.0, 0.0, 0.0])  # |h - g|^2, |g|^2, |h|^2
    for n, g in ref_grads.items():
        h = grads[n]
        s = stats[next((k for k in GROUPS if k in n), "other")]
        s[0] += (h - g).pow(2).sum().item()
        s[1] += g.pow(2).sum().item()
        s[2] += h.pow(2).sum().item()
    out = dict(loss=loss, rel_loss=loss / ref_loss - 1)
    for k, (d2, g2, h2) in sorted(stats.items()):
        out[k] = dict(rel_err=round((d2 / g2) ** 0.5, 4), cosine=round((g2 + h2 - d2) / 2 / (g2 * h2) ** 0.5, 4))
    return out


def main() -> None:
    bf16 = build("ours")
    fp8 = build("ours+fp8")
    fp8.load_state_dict(bf16.state_dict())
    ids = torch.randint(0, 32000, (8, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    routing = {}
    ref_loss, ref_grads = step(bf16, ids, record=routing)
    results = {"bf16 loss": ref_loss}
    results["fp8, same routing"] = compare(*step(fp8, ids, routing=routing), ref_loss, ref_grads)
    results["fp8"] = compare(*step(fp8, ids), ref_loss, ref_grads)
    del fp8
    perturbed = build("ours")
    g = torch.Generator("cuda").manual_seed(2)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + 2**-9 * torch.randn(p.shape, device="cuda", generator=g).to(p.dtype))
    results["bf16, perturbed"] = compare(*step(perturbed, ids), ref_loss, ref_grads)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
