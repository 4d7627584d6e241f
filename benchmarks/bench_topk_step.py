"""deepseek-v3-small's eager bf16 train step (bench_model_gpu's "ours" row) with kernels/topk_sum.py's kernels on and
off in turn, one process, against the built-in's step as the anchor: what the top-k sum and the routing weights'
gradient cost in eager mode with the kernels (the default on a GPU) and with the torch code (one index_add into
fp32; per-slot dot products).

    PYTHONPATH=. python benchmarks/bench_topk_step.py
"""

import bench_model_gpu as B  # beside this file: the script's folder is on sys.path
import torch
from modeling_deepseek_v3.kernels import topk_sum


def main() -> None:
    anchor = B.train_step_rate(B.build("builtin"), steps=20)["tokens_per_s"]
    print(f"built-in {anchor:,.0f} tokens/s")
    for _ in range(2):  # interleaved: drift between rows shows as a spread within each
        for on in (True, False):
            topk_sum.SUM_SLOTS_KERNEL = topk_sum.SLOT_DOTS_KERNEL = on
            r = B.train_step_rate(B.build("ours"), steps=20)
            print(f"{'kernels' if on else 'torch':8s} {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tokens_per_s'] / anchor:.3f}x the built-in, last loss {r['last_loss']:.4f}, "
                  f"peak {r['peak_GiB']:.2f} GiB", flush=True)  # fmt: skip
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
