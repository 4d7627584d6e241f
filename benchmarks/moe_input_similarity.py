"""Why the debug model's routing collapses in the `dsv3 train` demo: how alike its MoE layers' inputs are.

For a trained folder (default: the demo's output), prints per MoE layer the mean pairwise cosine similarity of the
MoE inputs of three docstring-like sentences and the norm of their mean vector over the mean norm (1 = every token
the same vector), then the expert loads and the largest router bias.

    dsv3 train && python benchmarks/moe_input_similarity.py dsv3-train-output/final
"""

import sys

import torch
import torch.nn.functional as F

from modeling_deepseek_v3 import DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

folder = sys.argv[1] if len(sys.argv) > 1 else "dsv3-train-output/final"
m = DSV3ForCausalLM.from_pretrained(folder).eval()
tok = load_tokenizer(folder)
text = ["Return the number of items in the container.", "Open the file and read its contents, then close it.",
        "Raise ValueError if the argument is negative."]  # fmt: skip
ids = tok(text, return_tensors="pt", padding=True).input_ids
acts = {}
for i, layer in enumerate(m.model.layers):
    if hasattr(layer.mlp, "gate"):
        layer.mlp.register_forward_hook(lambda mod, inp, out, i=i: acts.__setitem__(i, inp[0].detach()))
with torch.no_grad():
    out = m(ids)
for i, x in acts.items():
    x = x.reshape(-1, x.shape[-1])
    xn = F.normalize(x, dim=-1)
    cos = (xn @ xn.T)[~torch.eye(len(x), dtype=torch.bool)]
    print(f"layer {i}: mean pairwise cosine of MoE inputs {cos.mean().item():.3f}, "
          f"|mean| / mean |x| {(x.mean(0).norm() / x.norm(dim=-1).mean()).item():.3f}")  # fmt: skip
print("expert loads per MoE layer:", out.expert_load.tolist())
print(
    "largest |router bias| per layer:",
    [round(mo.gate.e_score_correction_bias.abs().max().item(), 4) for mo in m.moe_layers()],
)
