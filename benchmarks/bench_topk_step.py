"""deepseek-v3-small's eager bf16 train step (bench_model_gpu's "ours" row) with the eager MoE kernels on and off in
turn, one process, against the built-in's step as the anchor: everything on (the default on a GPU); the router's
expert choice in torch (kernels/router_topk.py off: three topk calls and the masking); and the top-k sum and the
routing weights' gradient in torch as well (kernels/topk_sum.py off: one index_add into fp32; per-slot dot products).

    PYTHONPATH=. python benchmarks/bench_topk_step.py
"""

import bench_model_gpu as B  # beside this file: the script's folder is on sys.path
import torch
from modeling_deepseek_v3.kernels import router_topk, topk_sum

ROWS = {"kernels": (True, True), "router in torch": (False, True), "torch": (False, False)}  # (router, top-k sum)


def main() -> None:
    anchor = B.train_step_rate(B.build("builtin"), steps=20)["tokens_per_s"]
    print(f"built-in {anchor:,.0f} tokens/s")
    for _ in range(2):  # interleaved: drift between rows shows as a spread within each
        for name, (router, topk) in ROWS.items():
            router_topk.ROUTE_TOPK_KERNEL = router
            topk_sum.SUM_SLOTS_KERNEL = topk_sum.SLOT_DOTS_KERNEL = topk
            r = B.train_step_rate(B.build("ours"), steps=20)
            print(f"{name:16s} {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tokens_per_s'] / anchor:.3f}x the built-in, last loss {r['last_loss']:.4f}, "
                  f"peak {r['peak_GiB']:.2f} GiB", flush=True)  # fmt: skip
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
