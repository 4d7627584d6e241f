"""CPU forward+backward: our DSV3ForCausalLM vs transformers' built-in DeepseekV3ForCausalLM, same config and weights.

    python benchmarks/bench_cpu_train_step.py                       # debug + small-ish, 2 threads
    python benchmarks/bench_cpu_train_step.py --configs small --repeats 9 --profile

Both models live in one process. Ours is saved with save_pretrained (official layout, no MTP) and loaded into the
built-in class, and the logits are checked equal before timing. Steps alternate between the two models (the order
flips every repeat) so load from other processes hits both alike; we report medians and ours/builtin.
Our loss includes the sequence-wise balance loss (seq_aux_loss_alpha = 1e-4, the paper's training objective); the
built-in's is cross-entropy only. `ours (alpha=0)` times our model without it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.info import load_config

# name -> (config overrides on hub_configs/deepseek-v3-debug, batch, seq_len)
SHAPES = {
    "debug": ({}, 4, 128),  # as shipped: the 129,280-token head dominates
    "small": (
        {
            "vocab_size": 8192,  # a small vocabulary so that the blocks, not the shared head, get measured
            "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
            "n_routed_experts": 32, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
        },
        4, 256,
    ),
}  # fmt: skip
BUILTIN_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
    "n_shared_experts", "first_k_dense_replace", "max_position_embeddings", "routed_scaling_factor",
    "rms_norm_eps", "norm_topk_prob",
)  # fmt: skip


def build_pair(name: str) -> tuple[DSV3Config, dict[str, torch.nn.Module], int, int]:
    overrides, batch, seq = SHAPES[name]
    config = load_config("deepseek-v3-debug")
    for key, value in {**overrides, "num_nextn_predict_layers": 0}.items():
        setattr(config, key, value)
    config.validate()
    torch.manual_seed(0)
    ours = DSV3ForCausalLM(config)
    with torch.no_grad():  # a nonzero correction bias, as after some training
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    builtin_config = DeepseekV3Config(
        **{k: getattr(config, k) for k in BUILTIN_FIELDS},
        rope_parameters=dict(config.rope_parameters),
        rope_interleave=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        builtin = DeepseekV3ForCausalLM.from_pretrained(folder, config=builtin_config)
        ours_no_aux = DSV3ForCausalLM.from_pretrained(folder, seq_aux_loss_alpha=0.0)
    models = {"ours": ours, "ours (alpha=0)": ours_no_aux, "builtin": builtin}
    for m in models.values():
        m.train()
    return config, models, batch, seq


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Wall and process-CPU seconds of one forward+backward. CPU time is less inflated by other processes."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, repeats: int, warmup: int, profile: bool) -> dict[str, float]:
    config, models, batch, seq = build_pair(name)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (models["ours"](ids).logits - models["builtin"](ids).logits).abs().max().item()
    print(f"\n== {name}: batch {batch} x seq {seq}, {sum(p.numel() for p in models['ours'].parameters()):,} params, "
          f"attn {models['ours'].config._attn_implementation}, experts ours={models['ours'].config.moe_implementation}"
          f" builtin={models['builtin'].config._experts_implementation}; max |logits diff| {diff:.2e}")  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    order = list(models)
    for r in range(warmup + repeats):
        for key in order if r % 2 else order[::-1]:
            t = train_step(models[key], ids)
            if r >= warmup:
                times[key].append(t)
    medians = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    for k, v in times.items():
        walls = [w for w, _ in v]
        print(f"  {k:<15} wall median {medians[k] * 1e3:7.1f} ms (min {min(walls) * 1e3:7.1f}, max "
              f"{max(walls) * 1e3:7.1f}, n={len(v)})   process CPU median {cpu[k] * 1e3:7.1f} ms")  # fmt: skip
    for k in ("ours", "ours (alpha=0)"):
        print(f"  ratio {k}/builtin: wall median {medians[k] / medians['builtin']:.3f}, "
              f"wall min {min(w for w, _ in times[k]) / min(w for w, _ in times['builtin']):.3f}, "
              f"CPU median {cpu[k] / cpu['builtin']:.3f}")  # fmt: skip
    if profile:
        for key in ("ours", "builtin"):
            with torch.profiler.profile() as prof:
                train_step(models[key], ids)
            print(f"\n-- profile {name} {key}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return medians


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step of each model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, threads {args.threads}")
    start = time.perf_counter()
    for name in args.configs:
        bench(name, args.repeats, args.warmup, args.profile)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
