"""Data parallelism on the CPU (gloo): 2 processes x 2 rows give identical router biases on both ranks and the
same losses as 1 process x 4 rows (the same global batch, split row-wise between the ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modeling_deepseek_v3.training.balancing import moe_layers
from modeling_deepseek_v3.training.pretrain import PretrainArguments, train
from modeling_deepseek_v3.training.reporting import read_metrics

ARGS = dict(seq_len=16, gradient_accumulation_steps=2, max_steps=4, warmup_steps=2, save_steps=4,
            bias_update_speed=0.01, plots=False)  # fmt: skip
KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm")


def test_two_process_gloo_matches_one_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path / "ddp"), json.dumps({**ARGS, "per_device_batch_size": 2})]  # fmt: skip
    # A new session lets a timeout end the workers too, not only the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-4000:]

    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"biases-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))  # bit-identical on every rank
    assert all(b.abs().max() > 0 for b in rank0)

    single = train(PretrainArguments(output_dir=str(tmp_path / "single"), per_device_batch_size=4, **ARGS))
    ddp, ref = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("ddp", "single"))
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in ref]
    # Same expert loads each step (routing is discrete: any drift beyond rounding would show here first) ...
    assert [r["expert_load"] for r in ddp] == [r["expert_load"] for r in ref]
    assert all(torch.equal(a, m.gate.e_score_correction_bias) for a, m in zip(rank0, moe_layers(single), strict=True))
    # ... and losses equal up to fp32 reduction order: DDP averages two 2-row gradients where one process sums four
    # rows, a relative difference of a few fp32 ulps (~1e-7) per step; over 4 steps 1e-5 relative bounds it with
    # margin, while a real mismatch (a wrong shard, a skipped sync, a doubled loss) moves losses by >1e-3.
    for a, b in zip(ddp, ref, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
