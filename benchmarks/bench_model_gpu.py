"""Side-by-side GPU benchmark: our DSV3ForCausalLM vs transformers' built-in DeepseekV3ForCausalLM, same process.

The shape is the anchors' 1.25B-total config (hub_configs/deepseek-v3-small without MTP, since the built-in has
none; vocab 32000 as in ../shared/anchors/hf_anchor.py). Measures a bf16 AdamW train step (B=8, S=2048) and
greedy decode (batch 1 / 512-token prompt, batch 16 / 4096-token prompts, 128 new tokens). "ours+compile" is the
same model with each decoder layer under torch.compile (regional compilation, as `dsv3 train --compile` does).
With --fp8, also "ours+fp8" and "ours+fp8+compile": the block-scaled FP8 kernels for the MLA projections, the
dense/shared MLPs and the routed experts (linear_implementation = moe_implementation = "fp8", as `dsv3 train
--fp8` sets them; embedding, router, norms and head stay bf16).

    PYTHONPATH=. python benchmarks/bench_model_gpu.py            # writes $OUT/bench_model_gpu.json if OUT is set
    PYTHONPATH=. python benchmarks/bench_model_gpu.py --train-only [--fp8] [--compile-mode reduce-overhead]
    PYTHONPATH=. python benchmarks/bench_model_gpu.py --train-only --rows ours+fp8 --profile   # the anchor always runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM

SHAPE = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
    n_shared_experts=2, first_k_dense_replace=1, max_position_embeddings=8192, rope_scaling=None,
)  # fmt: skip


def build(kind: str, compile_mode: str | None = None):
    torch.manual_seed(0)
    if kind.startswith("ours"):
        fp8 = dict(linear_implementation="fp8", moe_implementation="fp8") if "+fp8" in kind else {}
        model = DSV3ForCausalLM(DSV3Config(**SHAPE, num_nextn_predict_layers=0, seq_aux_loss_alpha=0.0, **fp8))
    else:
        cfg = DeepseekV3Config(**SHAPE)
        cfg._experts_implementation = "grouped_mm"
        model = DeepseekV3ForCausalLM(cfg)
    model = model.to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    for p in model.parameters():  # real-looking weights: routing spreads over experts
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    if kind.endswith("+compile"):
        model.compile_layers(mode=compile_mode)  # None: torch.compile's default mode
    return model


def train_step_rate(model, B=8, S=2048, steps=10, profile: str | None = None) -> dict:
    """profile: a row name: print where one more step's time goes (and, with $OUT set, every kernel of it into
    $OUT/profile_<row>.txt, "+" as "_"; the printed tables stop at 25 rows)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, SHAPE["vocab_size"], (B, S), device="cuda")

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # as dsv3 train does: lets CUDA-graph trees replay (no-op otherwise)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # Peak from before the warm-up: CUDA-graph replays allocate nothing, so a peak taken after recording would
    # miss the graphs' memory pools; eager and compiled steps peak the same in warm-up as after it.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    last_loss = loss.item()  # same batch every step: rows built alike should agree (FP8 within its rounding)
    if profile:  # one more step under the profiler, after the timed ones: where host and GPU time go
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            step()
            torch.cuda.synchronize()
        for sort in ("self_cpu_time_total", "self_cuda_time_total"):
            print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)
        if os.environ.get("OUT"):
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=-1, max_name_column_width=90)
            Path(os.environ["OUT"], f"profile_{profile.replace('+', '_')}.txt").write_text(table)  # `run` drops "+"
    return dict(
        last_loss=last_loss,
        tokens_per_s=B * S / dt,
        step_ms=dt * 1e3,
        peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
        reserved_GiB=torch.cuda.max_memory_reserved() / 2**30,
    )


@torch.no_grad()
def decode_rate(model, batch: int, context: int, new_tokens=128) -> dict:
    model.eval()
    prompt = torch.randint(0, SHAPE["vocab_size"], (batch, context), device="cuda")
    mask = torch.ones_like(prompt)
    model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(new_tokens_per_s=batch * new_tokens / dt, peak_GiB=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-only", action="store_true", help="skip the decode measurements")
    p.add_argument("--fp8", action="store_true", help="also train with the FP8 kernels, eager and compiled")
    p.add_argument("--compile-mode", help="torch.compile mode of the compiled rows (e.g. reduce-overhead: CUDA graphs "
                   "per layer, which take the FP8 kernels' host-side launch cost off the step)")  # fmt: skip
    p.add_argument("--rows", help="comma-separated rows to run besides the built-in anchor (default: all)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step of each row")
    args = p.parse_args()
    print(
        "torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(), flush=True
    )
    results = {}
    kinds = ["builtin", "ours", "ours+compile"] + (["ours+fp8", "ours+fp8+compile"] if args.fp8 else [])
    if args.rows:
        kinds = ["builtin"] + args.rows.split(",")
    for kind in kinds:
        model = build(kind, args.compile_mode)
        r = {
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "train": train_step_rate(model, profile=kind if args.profile else None),
        }
        print(kind, "train", json.dumps(r["train"]), flush=True)
        for batch, context in () if args.train_only or kind not in ("builtin", "ours") else ((1, 512), (16, 4096)):
            r[f"decode_bs{batch}_ctx{context}"] = decode_rate(model, batch, context)
            print(kind, f"decode bs{batch} ctx{context}", json.dumps(r[f"decode_bs{batch}_ctx{context}"]), flush=True)
        results[kind] = r
        del model
        torch.cuda.empty_cache()
    ratios = {
        **{
            f"train_tokens_per_s_{kind}": results[kind]["train"]["tokens_per_s"]
            / results["builtin"]["train"]["tokens_per_s"]
            for kind in kinds[1:]
        },
        **{
            k: results["ours"][k]["new_tokens_per_s"] / results["builtin"][k]["new_tokens_per_s"]
            for k in results.get("ours", {})
            if k.startswith("decode")
        },
    }
    results["ratio_ours_over_builtin"] = ratios
    print("ratios", json.dumps(ratios), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_model_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
