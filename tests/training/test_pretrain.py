"""`dsv3 train` end to end on the CPU with the debug config at seq_len 32: biases move, stay fp32 and are
checkpointed; resume is exact; a killed checkpoint write loses nothing; the output folder loads; training on the
embedded corpus lowers the losses; bad input names the problem."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from modeling_deepseek_v3.training import pretrain
from modeling_deepseek_v3.training.balancing import moe_layers
from modeling_deepseek_v3.training.pretrain import PretrainArguments, train
from modeling_deepseek_v3.training.reporting import read_metrics
from safetensors.torch import load_file

import modeling_deepseek_v3  # noqa: F401  (registers the Auto classes)
from modeling_deepseek_v3 import DSV3ForCausalLM

# 6 optimizer steps of 2 micro-batches x 2 rows x 16 tokens; lambda switches after step 3, gamma stops for step 6.
# Short rows keep the 129k-vocabulary output head (most of the CPU time) cheap.
TINY = dict(seq_len=16, per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=6, warmup_steps=2,
            save_steps=3, save_total_limit=None, bias_update_speed=0.01, bias_update_stop=0.2, mtp_weight_switch=0.5,
            plots=False)  # fmt: skip
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "maxvio_batch", "expert_load")


def run(output_dir, **overrides) -> DSV3ForCausalLM:
    return train(PretrainArguments(output_dir=str(output_dir), **{**TINY, **overrides}))


def trajectory(output_dir) -> list[tuple]:
    return [tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(os.path.join(output_dir, "metrics.jsonl"))]


def biases(model) -> list[torch.Tensor]:
    return [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    model = run(out, plots=True, report_to="tensorboard")
    return out, model


def test_run_outputs_schedules_and_biases(straight):
    out, model = straight
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["mtp_weight"] for r in records] == [0.3] * 3 + [0.1] * 3
    assert [r["gamma"] for r in records] == [0.01] * 5 + [0.0]
    assert records[0]["lr"] < records[1]["lr"] == pytest.approx(3e-3) and records[-1]["lr"] < records[1]["lr"]
    for r in records:  # the parts are logged apart, and add up to the objective
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["mtp_loss"] + r["aux_loss"], rel=1e-6)
        assert r["mtp_ce"] == pytest.approx(r["mtp_loss"] / r["mtp_weight"]) and 0 < r["aux_loss"] < 1e-3
        assert len(r["expert_load"]) == 3 and sum(r["expert_load"][0]) == 2 * 2 * 16 * 3  # tokens x top-3
    for name in ("loss_curves.png", "expert_load.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))

    # Biases moved by whole gamma steps (5 steps with gamma = 0.01), are fp32, and are in the checkpoints.
    final = biases(model)
    assert all(b.dtype == torch.float32 and b.abs().max() > 0 for b in final)
    assert all(b.abs().max() <= 5 * 0.01 + 1e-6 for b in final)
    ckpt = load_file(out / "checkpoints" / "step-0000006" / "model.safetensors")
    keys = sorted(k for k in ckpt if k.endswith("e_score_correction_bias"))
    assert len(keys) == 3 and all(ckpt[k].dtype == torch.float32 for k in keys)
    assert all(torch.equal(ckpt[k], b) for k, b in zip(keys, final, strict=True))
    step3 = load_file(out / "checkpoints" / "step-0000003" / "model.safetensors")
    assert not torch.equal(step3[keys[0]], ckpt[keys[0]])


def test_final_folder_loads(straight):
    from transformers import AutoModelForCausalLM

    from modeling_deepseek_v3.tokenizer import load_tokenizer

    out, model = straight
    ids = torch.tensor([[5, 17, 900, 3, 44, 12]])
    model.eval()
    reference = model(ids).logits
    for loader in (DSV3ForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(out / "final").eval()
        assert isinstance(loaded, DSV3ForCausalLM) and loaded.config.mtp_loss_weight == 0.3
        assert all(torch.equal(a, b) for a, b in zip(biases(loaded), biases(model), strict=True))
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=0, atol=0)
    assert len(load_tokenizer(out / "final")) == 128815


def test_resume_is_exact(straight, tmp_path):
    out, model = straight
    run(tmp_path, stop_at_step=3)
    assert not (tmp_path / "final").exists()
    resumed = run(tmp_path, resume=True)
    assert trajectory(tmp_path) == trajectory(out)  # every step's losses, grad norm and loads, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(biases(resumed), biases(model), strict=True))
    for (name, a), (_, b) in zip(resumed.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_killed_checkpoint_write_keeps_last_good(straight, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kwargs):
        if output_dir.endswith("step-0000006"):  # write part of the checkpoint, then die as if killed
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"partial")
            raise KeyboardInterrupt("killed during save")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    good = {f: hashlib.sha256((ckpts / "step-0000003" / f).read_bytes()).hexdigest() for f in os.listdir(ckpts / "step-0000003")}
    assert (ckpts / "LATEST").read_text() == "step-0000003"
    assert sorted(os.listdir(ckpts)) == [".tmp-step-0000006", "LATEST", "step-0000003"]
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    # a new run refuses to overwrite; --resume continues from the good checkpoint and matches the straight run
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path)
    assert {f: hashlib.sha256((ckpts / "step-0000003" / f).read_bytes()).hexdigest() for f in good} == good
    run(tmp_path, resume=True)
    assert trajectory(tmp_path) == trajectory(straight[0])
    assert sorted(os.listdir(ckpts)) == ["LATEST", "step-0000003", "step-0000006"]


def test_out_of_memory_names_the_fix_and_keeps_the_checkpoint(straight, tmp_path, monkeypatch):
    """An out-of-memory error in a training step (here raised by the 9th forward, in step 5, after the step-3
    checkpoint) says which arguments to change and how to resume; the checkpoint stays as written, and resuming
    from it continues the run as if nothing had happened."""
    real_forward = DSV3ForCausalLM.forward
    calls = []

    def forward_until_oom(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # 2 micro-batches a step: the first of step 5
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(DSV3ForCausalLM, "forward", forward_until_oom)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(torch.OutOfMemoryError, match="per_device_batch_size=2.*--gradient-checkpointing.*--resume"):
        run(tmp_path)
    assert (ckpts / "LATEST").read_text() == "step-0000003" and not (tmp_path / "final").exists()
    good = {f: hashlib.sha256((ckpts / "step-0000003" / f).read_bytes()).hexdigest() for f in os.listdir(ckpts / "step-0000003")}
    monkeypatch.setattr(DSV3ForCausalLM, "forward", real_forward)
    run(tmp_path, resume=True)
    assert trajectory(tmp_path) == trajectory(straight[0])
    assert {f: hashlib.sha256((ckpts / "step-0000003" / f).read_bytes()).hexdigest() for f in good} == good


def test_training_lowers_lm_and_mtp_loss(tmp_path):
    run(tmp_path, max_steps=20, per_device_batch_size=4, gradient_accumulation_steps=1, save_steps=20, warmup_steps=3)
    records = read_metrics(tmp_path / "metrics.jsonl")
    first, last = records[:3], records[-3:]
    for key in ("lm_loss", "mtp_ce"):
        before, after = (sum(r[key] for r in rs) / 3 for rs in (first, last))
        assert after < before - 1.0, (key, before, after)


def test_bad_input_names_the_problem(straight, tmp_path):
    with pytest.raises(ValueError, match="deepseek-v3-nonexistent.*deepseek-v3-debug"):
        run(tmp_path, model="deepseek-v3-nonexistent")
    with pytest.raises(ValueError, match="aux_loss_scope"):
        run(tmp_path, aux_loss_scope="global")
    with pytest.raises(ValueError, match="bias_update_speed"):
        run(tmp_path, bias_update_speed=-1.0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run(tmp_path, data_files=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="--compile_mode reduce-overhead applies to --compile"):
        run(tmp_path, compile_mode="reduce-overhead")
    small = tmp_path / "small-vocab"
    small.mkdir()
    config = json.loads(pretrain.load_config("deepseek-v3-debug").to_json_string())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="vocab_size=1000 is smaller than the tokenizer's 128815"):
        run(tmp_path, model=str(small))
    out = straight[0]
    before = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(ValueError, match=r"run\.seq_len: checkpoint 16 vs now 8"):
        run(out, seq_len=8, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path / "fresh", resume=True)
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_cli_parses_dashed_arguments():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(
        ["--max-steps", "7", "--data-files", "a.jsonl", "b.jsonl", "--gradient-checkpointing", "--resume"]
    )
    assert args.max_steps == 7 and args.data_files == ["a.jsonl", "b.jsonl"] and args.gradient_checkpointing and args.resume


def test_gradient_checkpointing_is_exact(straight, tmp_path):
    # Non-reentrant recomputation repeats the forward bit for bit (aux loss included), so nothing may change.
    run(tmp_path, gradient_checkpointing=True, stop_at_step=2)
    assert trajectory(tmp_path) == trajectory(straight[0])[:2]


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed per process otherwise
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision(straight, tmp_path, fresh_accelerate_state):
    model = run(tmp_path, mixed_precision="bf16", stop_at_step=2)
    assert all(b.dtype == torch.float32 and b.abs().max() > 0 for b in biases(model))
    assert next(model.parameters()).dtype == torch.float32  # autocast: fp32 master weights, bf16 matmuls
    ours, reference = read_metrics(tmp_path / "metrics.jsonl"), read_metrics(straight[0] / "metrics.jsonl")[:2]
    for bf16, fp32 in zip(ours, reference, strict=True):
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); 1% bounds the loss drift of 2 tiny steps.
        assert bf16["lm_loss"] == pytest.approx(fp32["lm_loss"], rel=1e-2)
        assert bf16["lm_loss"] != fp32["lm_loss"]  # bf16 really ran
