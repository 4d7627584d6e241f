"""GPU check of `dsv3 grpo`'s trainer: TRL GRPO on deepseek-v3-small in bf16, generation through the latent cache.

Builds deepseek-v3-small (random init, seed 0; speed does not depend on the weights) with the packaged DeepSeek-V3
tokenizer in a local folder, then runs training/grpo.py's `build_grpo_trainer` on the shipped arithmetic task with
the correctness and format rewards and the MoE balance callback. Reports optimizer steps/s (after 2 warm-up steps),
generation tokens/s (new positions produced by `generate`, all rows, over the time spent inside `generate`) and peak
GPU memory.

    python benchmarks/bench_grpo_gpu.py --steps 30      # needs trl, peft, datasets; writes $OUT/bench_grpo_gpu.json
    python benchmarks/bench_grpo_gpu.py --steps 30 --cache-implementation static     # fast_decode generation
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers
import trl
from modeling_deepseek_v3.training.grpo import build_grpo_trainer
from modeling_deepseek_v3.training.tasks import arithmetic_dataset
from transformers import TrainerCallback
from trl import GRPOConfig

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

HUB_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hub_configs")
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.ends.append(time.perf_counter())


def timed_generate(model, totals: dict):
    """Wrap the model's generate to count the new positions it produces and the time spent in it."""
    generate = model.generate

    def wrapper(*args, **kwargs):
        prompt_len = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        sync()
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        sync()
        sequences = out if torch.is_tensor(out) else out.sequences
        totals["seconds"] += time.perf_counter() - t0
        totals["new_positions"] += sequences.shape[0] * (sequences.shape[1] - prompt_len)
        totals["calls"] += 1
        return out

    model.generate = wrapper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--config", default="deepseek-v3-small", help="hub_configs name (deepseek-v3-debug for a CPU try)")
    p.add_argument("--folder", default="/tmp/dsv3-grpo-bench")
    p.add_argument("--cache-implementation", default=None,
                   help="'static': generation through fast_decode (static latent cache, CUDA graph)")  # fmt: skip
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = DSV3ForCausalLM(DSV3Config.from_pretrained(os.path.join(HUB_CONFIGS, args.config))).to(dtype)
    tokenizer = load_tokenizer()
    model.save_pretrained(args.folder)
    tokenizer.save_pretrained(args.folder)
    del model

    grpo_args = GRPOConfig(
        output_dir="/tmp/grpo-out", max_steps=args.steps, per_device_train_batch_size=args.batch,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=1e-6, logging_steps=1, bf16=CUDA, use_cpu=not CUDA, gradient_checkpointing=True, report_to="none",
        save_strategy="no", seed=0, cache_implementation=args.cache_implementation,
    )  # fmt: skip
    data = arithmetic_dataset(2000, level="easy").select_columns(["prompt", "answer"])
    trainer = build_grpo_trainer(args.folder, data, grpo_args, tokenizer=tokenizer, dtype=str(dtype).split(".")[1])
    gen = {"seconds": 0.0, "new_positions": 0, "calls": 0}
    timed_generate(trainer.model, gen)
    timer = StepTimer()
    trainer.add_callback(timer)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    warm = timer.ends[2:]
    steps_per_s = (len(warm) - 1) / (warm[-1] - warm[0])
    logs = trainer.state.log_history
    rewards = [h.get("reward") for h in logs if "reward" in h]
    result = {
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "model_params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "args": vars(args), "train_seconds": total, "steps_per_s_after_warmup": steps_per_s,
        "generation_tokens_per_s": gen["new_positions"] / gen["seconds"], "generation_seconds": gen["seconds"],
        "generate_calls": gen["calls"], "generation_share_of_time": gen["seconds"] / total,
        "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
        "mean_completion_length": [h.get("completions/mean_length") for h in logs if "completions/mean_length" in h],
        "reward": rewards, "moe_maxvio": [h.get("moe/maxvio") for h in logs if "moe/maxvio" in h],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
    print("reward first/last", rewards[:3], rewards[-3:], flush=True)
    if os.environ.get("OUT"):
        name = f"bench_grpo_gpu{'_' + args.cache_implementation if args.cache_implementation else ''}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
