"""Two-GPU check of `dsv3 train` under FSDP2 (training/accelerate_configs/fsdp2.yaml), which accelerate only runs on
GPUs (on the CPU it falls back to plain data parallelism, so CI cannot cover it).

Runs, each `accelerate launch --num_processes 2` of tests/training/ddp_worker.py on the debug config in fp32:
1. FSDP2, straight through `--steps` optimizer steps;
2. FSDP2, stopped (checkpoint: sharded model and optimizer, RNG, data position, run-total loads) at half and
   resumed in a new launch;
3. DDP (training/accelerate_configs/ddp.yaml), the same global batch.
It checks that router biases are bit-identical on both ranks, that the resumed run's trajectory follows the
straight run's, that FSDP2's losses follow DDP's, and that the gathered final folder loads with from_pretrained.

    python benchmarks/fsdp2_check.py            # on a 2-GPU machine; writes $OUT/fsdp2_check.json
    python benchmarks/fsdp2_check.py --mixed-precision bf16   # the same runs under bf16 mixed precision
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "training" / "ddp_worker.py"
KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "maxvio_batch")


def launch(config: str, output_dir: Path, overrides: dict, cpu: bool) -> None:
    mixed_precision = overrides["mixed_precision"]
    if cpu:  # accelerate launch --cpu runs one process: the dry run uses torchrun over gloo (plain data parallel)
        launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        launcher = ["accelerate.commands.launch", "--config_file", str(ROOT / "training" / "accelerate_configs" / config),
                    "--num_processes", "2", "--mixed_precision", mixed_precision]  # fmt: skip
    cmd = [sys.executable, "-m", *launcher, str(WORKER), str(output_dir), json.dumps(overrides)]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"} if cpu else None)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[dict], b: list[dict]) -> dict:
    assert [r["step"] for r in a] == [r["step"] for r in b], "different steps"
    return {k: max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b, strict=True)) for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default="deepseek-v3-debug")
    p.add_argument("--cpu", action="store_true", help="dry run of this script on CPUs (no FSDP there)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="bf16: FSDP2's bf16 compute policy (routers kept fp32 by dsv3 train) against DDP's autocast; "
                        "the two then compute different functions, so expect agreement to bf16 precision, not 1e-7")  # fmt: skip
    args = p.parse_args()
    base = dict(model=args.model, seq_len=64, per_device_batch_size=4, gradient_accumulation_steps=2,
                max_steps=args.steps, warmup_steps=2, save_steps=args.steps // 2, bias_update_speed=0.01, plots=False,
                mixed_precision=args.mixed_precision)  # fmt: skip  # "no": FSDP2 and DDP compute the same function
    work = Path(tempfile.mkdtemp())
    launch("fsdp2.yaml", work / "straight", base, args.cpu)
    launch("fsdp2.yaml", work / "resumed", {**base, "stop_at_step": args.steps // 2}, args.cpu)
    launch("fsdp2.yaml", work / "resumed", {**base, "resume": True}, args.cpu)
    launch("ddp.yaml", work / "ddp", base, args.cpu)

    result = {"args": vars(args), "gpus": torch.cuda.device_count(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip
    for run in ("straight", "resumed", "ddp"):
        rank0, rank1 = (torch.load(work / run / f"biases-rank{r}.pt", map_location="cpu") for r in (0, 1))
        result[f"{run}_biases_identical_across_ranks"] = all(
            torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True)
        )
        result[f"{run}_bias_max_abs"] = max(b.abs().max().item() for b in rank0)
    straight, resumed, ddp = (metrics(work / run) for run in ("straight", "resumed", "ddp"))
    result["resumed_vs_straight_max_rel_diff"] = max_rel_diff(resumed, straight)
    result["resumed_loads_equal_straight"] = [r["expert_load"] for r in resumed] == [r["expert_load"] for r in straight]
    result["fsdp2_vs_ddp_max_rel_diff"] = max_rel_diff(straight, ddp)
    result["fsdp2_loads_equal_ddp"] = [r["expert_load"] for r in straight] == [r["expert_load"] for r in ddp]
    result["losses_straight"] = [r["loss"] for r in straight]
    result["checkpoint_files"] = sorted(
        os.listdir(work / "straight" / "checkpoints" / sorted(os.listdir(work / "straight" / "checkpoints"))[-1])
    )

    from modeling_deepseek_v3 import DSV3ForCausalLM

    final = DSV3ForCausalLM.from_pretrained(work / "straight" / "final")
    saved = torch.load(work / "straight" / "biases-rank0.pt", map_location="cpu")
    result["final_folder_biases_equal_rank0"] = all(
        torch.equal(a.cpu(), m.gate.e_score_correction_bias) for a, m in zip(saved, final.moe_layers(), strict=True)
    )
    print(json.dumps(result, indent=1), flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "fsdp2_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
