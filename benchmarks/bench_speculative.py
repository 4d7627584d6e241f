"""GPU benchmark: plain greedy `generate()` vs MTP self-speculative greedy decoding (speculative.mtp_generate).

deepseek-v3-small in bf16, batch 1 with a 512-token prompt and batch 16 with 4096-token prompts (issue 8's shapes),
128 new tokens, tokens/s counted with the prefill included (as DESIGN.md's anchors). Randomly initialised weights
say nothing about acceptance, so three MTP settings are measured:
- random: the MTP module as initialised; acceptance ~0, so this is the overhead floor of speculation;
- copy: `make_copying_mtp_` rewires the weights so MTP predicts exactly what the main model will (same compute,
  acceptance ~1 up to bf16 ties): the ceiling;
- trained (--model-dir): a real checkpoint, e.g. the small model pretrained with MTP on.
Greedy agreement with plain generate() is reported too: exact in fp32 (the CPU tests), while in bf16 a verify
forward over D+1 tokens may round differently from D+1 single-token forwards and flip a near-tie argmax.

    PYTHONPATH=. python benchmarks/bench_speculative.py                     # writes $OUT/bench_speculative.json
    PYTHONPATH=. python benchmarks/bench_speculative.py --depth 2 --settings copy
    PYTHONPATH=. python benchmarks/bench_speculative.py --model-dir /path/to/trained --settings trained
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.speculative import make_copying_mtp_, mtp_generate

SMALL = Path(__file__).resolve().parents[1] / "hub_configs" / "deepseek-v3-small"


def build(setting: str, depth: int, model_dir: str | None) -> DSV3ForCausalLM:
    if setting == "trained":
        return DSV3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    torch.manual_seed(0)
    config = DSV3Config.from_pretrained(SMALL, num_nextn_predict_layers=depth, seq_aux_loss_alpha=0.0)
    config._attn_implementation = "sdpa"
    model = DSV3ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():  # real-looking weights: routing spreads over experts (as bench_model_gpu)
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return make_copying_mtp_(model) if setting == "copy" else model


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


@torch.no_grad()
def compare(model: DSV3ForCausalLM, batch: int, context: int, new_tokens: int) -> dict:
    vocab = model.config.vocab_size
    prompt = torch.randint(2, vocab, (batch, context), device="cuda")
    mask = torch.ones_like(prompt)
    # eos off: every row decodes exactly new_tokens tokens on both paths.
    plain_kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, **plain_kw)  # warm-up (kernels, allocator)
    mtp_generate(model, prompt, mask, max_new_tokens=8)
    plain, t_plain = timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, **plain_kw))
    spec, t_spec = timed(lambda: mtp_generate(model, prompt, mask, max_new_tokens=new_tokens))
    n = batch * new_tokens
    same = (plain[:, context:] == spec.sequences[:, context:]).float()
    first_diff = (same.cumprod(1).sum(1)).float().mean().item()  # tokens until the first divergence, row mean
    return dict(
        plain_tokens_per_s=n / t_plain,
        mtp_tokens_per_s=n / t_spec,
        speedup=t_plain / t_spec,
        acceptance_rate=spec.acceptance_rate,
        mean_accepted_length=spec.mean_accepted_length,
        verify_steps=spec.steps,
        identical_rows=int((same.min(1).values == 1).sum()),
        mean_tokens_before_divergence=first_diff,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=1, help="MTP modules for random/copy (the small config has 1)")
    p.add_argument("--settings", nargs="+", default=["random", "copy"], choices=["random", "copy", "trained"])
    p.add_argument("--model-dir", help="checkpoint for --settings trained")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--shapes", default="1x512,16x4096", help="comma-separated BATCHxCONTEXT")
    args = p.parse_args()
    print(
        "torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(), flush=True
    )
    results = {}
    for setting in args.settings:
        model = build(setting, args.depth, args.model_dir)
        for shape in args.shapes.split(","):
            batch, context = map(int, shape.split("x"))
            r = compare(model, batch, context, args.new_tokens)
            results[f"{setting}_bs{batch}_ctx{context}"] = r
            print(setting, f"bs{batch} ctx{context}", json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
        del model
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_speculative.json"), "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=1)


if __name__ == "__main__":
    main()
