"""Data parallelism on the CPU (gloo): 2 processes x 2 rows give identical router biases on both ranks and the
same losses as 1 process x 4 rows (the same global batch, split row-wise between the ranks); the same with the
model sharded by FSDP2."""

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


def _torchrun(worker: Path, *args: str) -> None:
    """`torchrun --nproc_per_node 2 worker args` on the CPU; the workers' stderr tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    # A new session lets a timeout end the workers too, not only the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-4000:]


def test_two_process_gloo_matches_one_process(tmp_path):
    _torchrun(Path(__file__).with_name("ddp_worker.py"), str(tmp_path / "ddp"), json.dumps({**ARGS, "per_device_batch_size": 2}))

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


def test_fsdp2_sharded_model_matches_one_process(tmp_path):
    """FSDP2 (`fully_shard` per decoder/MTP layer and the root, as fsdp2.yaml wraps) on 2 CPU ranks: the same losses,
    router biases and parameter updates as one unsharded process. Found by this test: the MTP head's norm ran outside
    its module's forward, where FSDP2 had not gathered its weight (mixed Tensor/DTensor error)."""
    worker = Path(__file__).with_name("fsdp2_worker.py")
    (tmp_path / "ref").mkdir()
    (tmp_path / "fsdp").mkdir()
    subprocess.run([sys.executable, str(worker), str(tmp_path / "ref")], check=True, capture_output=True, timeout=240)
    _torchrun(worker, str(tmp_path / "fsdp"))

    ref_losses, losses = (json.loads((tmp_path / d / "losses.json").read_text()) for d in ("ref", "fsdp"))
    # fp32 reduction order only (two half-batch gradients averaged vs one batch): a few ulps per step.
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # the total gradient norm over the sharded gradients (clip_grad_norm_ on DTensors): measured 1e-6 from the reference
    ref_norms, norms = (json.loads((tmp_path / d / "grad_norms.json").read_text()) for d in ("ref", "fsdp"))
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    rank0, rank1, ref = (torch.load(tmp_path / d / f"biases-rank{r}.pt") for d, r in (("fsdp", 0), ("fsdp", 1), ("ref", 0)))
    assert all(torch.equal(a, b) and torch.equal(a, c) and a.abs().max() > 0 for a, b, c in zip(rank0, rank1, ref, strict=True))
    initial, ref_state, state = (torch.load(tmp_path / d / f) for d, f in (("ref", "initial.pt"), ("ref", "state.pt"),
                                                                              ("fsdp", "state.pt")))  # fmt: skip
    assert state.keys() == ref_state.keys()
    keys = [k for k, v in initial.items() if v.is_floating_point() and "e_score_correction_bias" not in k]
    update_ref = torch.cat([(ref_state[k] - initial[k]).flatten() for k in keys])
    update = torch.cat([(state[k] - initial[k]).flatten() for k in keys])
    # SGD: the update is linear in the gradient, so a wrong average over ranks (a sum, a half, one shard's) would
    # put this at ~1; rounding of the reduce-scatter puts it near 1e-6 (measured 6.4e-7).
    assert (update - update_ref).norm() / update_ref.norm() < 1e-4


def test_fsdp2_bf16_policy_keeps_the_router_fp32(tmp_path):
    """Under a bf16 MixedPrecisionPolicy (accelerate's FSDP2 mixed_precision="bf16") FSDP2 gathers every parameter of a
    unit in bf16, the router weight included; `fully_shard_routers_fp32` (called by `dsv3 train`) gives each router
    its own fp32 unit. Both runs train, and the losses stay near the fp32 reference (bf16 compute elsewhere)."""
    worker = Path(__file__).with_name("fsdp2_worker.py")
    (tmp_path / "ref").mkdir()
    subprocess.run([sys.executable, str(worker), str(tmp_path / "ref")], check=True, capture_output=True, timeout=240)
    ref_losses = json.loads((tmp_path / "ref" / "losses.json").read_text())
    ref_norms = json.loads((tmp_path / "ref" / "grad_norms.json").read_text())
    for precision, expected in (("bf16", ["torch.bfloat16"]), ("bf16-router-fp32", ["torch.float32"])):
        (tmp_path / precision).mkdir()
        _torchrun(worker, str(tmp_path / precision), precision)
        assert json.loads((tmp_path / precision / "router_dtypes.json").read_text()) == expected, precision
        losses = json.loads((tmp_path / precision / "losses.json").read_text())
        # bf16 parameters and matmuls (relative rounding 4e-3 per value, averaging out over the sums) move these
        # losses by ~1e-4 relative (measured 1.1e-4); a broken unit (wrong gather, unreduced or doubled gradient,
        # a router left unsharded) moves the later steps' losses by 1e-2 or more.
        assert losses == pytest.approx(ref_losses, rel=1e-3), precision
        # The total gradient norm under the bf16 policy (bf16 gradients reduce-scattered, then the fp32 shards'
        # norm) follows the fp32 reference to bf16 precision (measured <= 8.1e-3 relative); a wrong reduction
        # (summed: 2x, one shard's: ~0.7x) or a clip on bf16 values gone wrong would be far outside 3e-2.
        norms = json.loads((tmp_path / precision / "grad_norms.json").read_text())
        assert norms == pytest.approx(ref_norms, rel=3e-2), precision
