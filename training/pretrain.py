"""Pretrain DeepSeek-V3 with Accelerate: auxiliary-loss-free balancing, MTP, the paper's schedules, exact resume.

    # CPU demo (~1-2 min): debug config, embedded corpus (Python stdlib docstrings), writes ./dsv3-train-output
    dsv3 train
    dsv3 train --resume                                           # continue the same run from its last checkpoint
    dsv3 train --model deepseek-v3-small --data-files "corpus/*.jsonl" --seq-len 2048 --per-device-batch-size 8 \\
        --max-steps 2000 --learning-rate 4e-4 --gradient-checkpointing --output-dir runs/small
    accelerate launch --config_file training/accelerate_configs/ddp.yaml -m modeling_deepseek_v3.training.pretrain \\
        --model deepseek-v3-small --data-files "corpus/*.parquet" --report-to tensorboard
    accelerate launch --config_file training/accelerate_configs/fsdp2.yaml -m modeling_deepseek_v3.training.pretrain ...

One optimizer step = gradient_accumulation_steps micro-batches of per_device_batch_size rows on every rank.
Objective: lm CE + (lambda/D) sum MTP CE + alpha seq-balance (the model's `loss`). After each optimizer step (when
`accelerator.sync_gradients`) every MoE router bias moves by gamma * sign(mean load - load) from the step's loads
summed over micro-batches and ranks (training/balancing.py). Schedules are functions of the fraction of training
tokens seen (= step / max_steps): the learning rate warms up, stays constant, then decays by a cosine; lambda is 0.3,
then 0.1; gamma drops to 0 for the final tokens (the paper: 0.3 for 10T of 14.8T tokens; gamma 0 for the last 500B).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from modeling_deepseek_v3 import DSV3Config, DSV3ForCausalLM
from modeling_deepseek_v3.tokenizer import load_tokenizer

from .balancing import ExpertLoadTracker, keep_routers_fp32_under_fsdp2, moe_layers
from .checkpointing import check_same_run, latest_checkpoint, save_checkpoint
from .data import build_dataset
from .reporting import MetricsWriter, plot_run

HUB_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hub_configs")


@dataclass
class PretrainArguments:
    model: str = field(default="deepseek-v3-debug", metadata={"help": "hub_configs name, or a folder with config.json (and weights to continue from)"})
    output_dir: str = field(default="dsv3-train-output", metadata={"help": "checkpoints/, metrics.jsonl, plots and final/ go here"})
    data_files: list[str] | None = field(default=None, metadata={"help": "local .txt/.md/.jsonl/.json/.parquet/.csv files or globs; default: the embedded corpus"})
    text_column: str = "text"
    seq_len: int = 64
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    decay_start: float = field(default=0.6, metadata={"help": "fraction of steps after which the cosine decay starts"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate / peak (paper: 2.2e-5 / 2.2e-4)"})
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    bias_update_speed: float | None = field(default=None, metadata={"help": "gamma; default: the config's (0.001)"})
    bias_update_stop: float = field(default=500 / 14800, metadata={"help": "final fraction of tokens with gamma = 0"})
    seq_aux_loss_alpha: float | None = field(default=None, metadata={"help": "alpha; default: the config's (0.0001)"})
    aux_loss_scope: str | None = field(default=None, metadata={"help": "sequence (the paper's) or batch (the classic auxiliary loss); default: the config's"})
    mtp_loss_weight: float | None = field(default=None, metadata={"help": "lambda at first; default: the config's (0.3)"})
    mtp_loss_weight_final: float = 0.1
    mtp_weight_switch: float = field(default=10 / 14.8, metadata={"help": "fraction of tokens after which lambda is final"})
    mixed_precision: str = field(default="auto", metadata={"help": "no (fp32), bf16, or auto (bf16 on a bf16 GPU, else no)"})
    fp8: bool = field(default=False, metadata={"help": "block-scaled FP8 (kernels/) for the MLA projections, dense/shared MLPs and routed experts; embedding, router, norms and head stay high precision. Needs a CUDA GPU of compute capability >= 8.9 and Triton"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder/MTP layer (regional compilation)"})
    compile_mode: str | None = field(default=None, metadata={"help": "torch.compile mode for --compile: default, reduce-overhead (CUDA graphs per layer: takes the kernels' host-side launch cost off the step) or max-autotune"})
    use_cpu: bool = field(default=False, metadata={"help": "train on the CPU even with a GPU (always the case without CUDA)"})
    gradient_checkpointing: bool = False
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int | None = 2
    resume: bool = field(default=False, metadata={"help": "continue the run in output_dir from its latest checkpoint"})
    overwrite_output_dir: bool = False
    stop_at_step: int | None = field(default=None, metadata={"help": "checkpoint and exit after this step (schedules still span max_steps)"})
    report_to: str = field(default="none", metadata={"help": "none or tensorboard (JSONL is always written)"})
    plots: bool = True


def load_config(name_or_path: str) -> DSV3Config:
    folder = name_or_path if os.path.isdir(name_or_path) else os.path.join(HUB_CONFIGS, name_or_path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        known = sorted(d for d in os.listdir(HUB_CONFIGS) if os.path.isfile(os.path.join(HUB_CONFIGS, d, "config.json")))
        raise ValueError(f"model {name_or_path!r} is neither a folder with config.json nor a hub config ({', '.join(known)})")
    return DSV3Config.from_pretrained(folder)


def lr_factor(step: int, args: PretrainArguments) -> float:
    """Warmup (linear) -> constant -> cosine decay to min_lr_ratio over the last (1 - decay_start) of steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    decay_from = max(int(args.decay_start * args.max_steps), args.warmup_steps)
    if step < decay_from:
        return 1.0
    progress = (step - decay_from) / max(args.max_steps - decay_from, 1)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class RunState:
    """The loop's own state, saved by accelerator.save_state: step, data position, run-total expert loads."""

    def __init__(self, dataset, tracker: ExpertLoadTracker):
        self.step, self.dataset, self.tracker = 0, dataset, tracker

    def state_dict(self) -> dict:
        return {"step": self.step, "data": self.dataset.state_dict(), "loads": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.dataset.load_state_dict(state["data"])
        self.tracker.load_state_dict(state["loads"])


def train(args: PretrainArguments) -> DSV3ForCausalLM:
    """Run (or resume) training; returns the trained, unwrapped model (same biases on every rank)."""
    if args.compile_mode is not None and not args.compile:
        raise ValueError(f"--compile_mode {args.compile_mode} applies to --compile, which is off: pass both")
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    lambdas = (args.mtp_loss_weight, args.mtp_loss_weight_final)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.use_cpu or not torch.cuda.is_available(),  # also what makes torchrun on CPUs a gloo process group
        # lambda = 0 skips the MTP layers, whose parameters DDP must then be told to expect no gradient for.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=0 in lambdas)],
    )
    set_seed(args.seed)
    config = load_config(args.model)
    for key in ("bias_update_speed", "seq_aux_loss_alpha", "aux_loss_scope", "mtp_loss_weight"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    if args.fp8:  # FP8 compute is a backend choice of the model (one selection point), not a checkpoint property
        config.linear_implementation, config.moe_implementation = "fp8", "fp8"
        # Eager micro-batches after the first reuse the quantised weights (QuantizedWeightCache; compiled layers
        # quantise on every call, so the cache would only hold memory there).
        config.fp8_weight_cache = args.gradient_accumulation_steps > 1 and not args.compile
    config.validate()  # the overrides above, checked with the config's own rules
    gamma0, lambda0 = config.bias_update_speed, config.mtp_loss_weight
    tokenizer = load_tokenizer(args.model if os.path.isdir(args.model) else None)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"config vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    dataset = build_dataset(tokenizer, args.seq_len, args.data_files, args.text_column, args.seed, config.vocab_size)
    global_batch = args.per_device_batch_size * accelerator.num_processes

    ckpt_root = os.path.join(args.output_dir, "checkpoints")
    resume_from = latest_checkpoint(ckpt_root)
    if args.resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}")
    if resume_from and not (args.resume or args.overwrite_output_dir):
        raise FileExistsError(f"{args.output_dir} already holds checkpoints: pass --resume or --overwrite-output-dir")
    if resume_from and args.overwrite_output_dir and not args.resume and accelerator.is_main_process:
        shutil.rmtree(ckpt_root)
    run_info = {
        "config": {k: v for k, v in config.to_dict().items() if k not in ("bias_update_speed", "mtp_loss_weight", "transformers_version")},
        "run": {"seq_len": args.seq_len, "global_batch": global_batch, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "max_steps": args.max_steps, "seed": args.seed, "data": dataset.fingerprint},
    }  # fmt: skip
    if args.resume:
        check_same_run(resume_from, run_info)  # before anything is loaded or overwritten

    weights = os.path.isdir(args.model) and any(f.endswith(".safetensors") for f in os.listdir(args.model))
    model = DSV3ForCausalLM.from_pretrained(args.model, config=config) if weights else DSV3ForCausalLM(config)
    if args.gradient_checkpointing:  # non-reentrant: the recomputed forward keeps grad mode, so the aux loss exists
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_routers_fp32_under_fsdp2(accelerator, model)  # before the optimizer sees the parameters
    if args.compile:
        model.compile_layers(mode=args.compile_mode)
    if args.fp8 and accelerator.device.type == "cuda" and args.compile_mode != "reduce-overhead":
        warnings.warn("--fp8 without CUDA graphs is host-bound at small hidden sizes: on an H200 the FP8 step of "
                      "deepseek-v3-small ran 2x faster with --compile --compile_mode reduce-overhead "
                      "(benchmarks/RESULTS.md)", stacklevel=2)  # fmt: skip
    # No weight decay on norms (1-D); the router bias is a buffer, moved only by the balancing rule.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    # fused: one kernel for the whole update instead of foreach's several per parameter group (the benchmark's
    # anchor and transformers' Trainer default on a GPU); it runs on the CPU too.
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    layers = moe_layers(model)
    tracker = ExpertLoadTracker(len(layers), config.n_routed_experts)
    state = RunState(dataset, tracker)
    accelerator.register_for_checkpointing(state)
    if args.resume:
        accelerator.load_state(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    metrics = MetricsWriter(args.output_dir, state.step if args.resume else None, args.report_to == "tensorboard") if accelerator.is_main_process else None

    stop = min(args.stop_at_step or args.max_steps, args.max_steps)
    tokens_per_step = global_batch * args.seq_len * args.gradient_accumulation_steps
    bar = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    model.train()
    while state.step < stop:
        start, fraction = time.perf_counter(), state.step / args.max_steps  # = fraction of training tokens seen
        gamma = 0.0 if fraction >= 1 - args.bias_update_stop else gamma0
        unwrapped.config.mtp_loss_weight = lambda0 if fraction < args.mtp_weight_switch else args.mtp_loss_weight_final
        unwrapped.config.bias_update_speed = gamma
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * lr_factor(state.step, args)
        zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, lm, mtp, aux over micro-batches
        for _ in range(args.gradient_accumulation_steps):
            rows = dataset.next_rows(global_batch)  # every rank draws the global batch and keeps its slice
            rows = rows[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)
            with accelerator.accumulate(model), _explain_oom(args):
                if args.compile:  # a new step for CUDA-graph trees: the last micro-batch's graph outputs are consumed
                    torch.compiler.cudagraph_mark_step_begin()
                out = model(input_ids=rows, labels=rows)
                accelerator.backward(out.loss)
                tracker.add(out.expert_load)
                parts = (out.loss, out.lm_loss, out.mtp_loss, out.aux_loss)
                sums += torch.stack([p.detach().double() if p is not None else zero for p in parts])
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) if accelerator.sync_gradients else None
                optimizer.step()
                optimizer.zero_grad()
        assert accelerator.sync_gradients, "the step's last micro-batch must sync gradients"
        loads_LE, maxvio_L = tracker.step(model, gamma)  # identical on every rank
        state.step += 1
        losses = accelerator.reduce(sums / args.gradient_accumulation_steps, "mean").tolist()
        lam = unwrapped.config.mtp_loss_weight
        record = {
            "step": state.step, "tokens": state.step * tokens_per_step, "lr": optimizer.param_groups[0]["lr"],
            "loss": losses[0], "lm_loss": losses[1], "mtp_loss": losses[2], "mtp_ce": losses[2] / lam if lam else None,
            "aux_loss": losses[3], "mtp_weight": lam, "gamma": gamma, "grad_norm": float(grad_norm),
            "maxvio_batch": float(maxvio_L.mean()), "maxvio_global": float(tracker.global_max_violation().mean()),
            "maxvio_batch_per_layer": maxvio_L.tolist(), "expert_load": loads_LE.tolist(),
            "tokens_per_s": tokens_per_step / (time.perf_counter() - start),
        }  # fmt: skip
        if metrics is not None:
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", maxvio=f"{record['maxvio_batch']:.2f}")
        if state.step % args.save_steps == 0 or state.step == stop:
            save_checkpoint(accelerator, ckpt_root, state.step, run_info, keep=args.save_total_limit)
    bar.close()

    if state.step >= args.max_steps:
        unwrapped.config.bias_update_speed, unwrapped.config.mtp_loss_weight = gamma0, lambda0  # describe the model, not the schedule's end
        if args.fp8:  # how this run computed, not what the weights need: the saved folder loads anywhere (CPU too)
            unwrapped.config.linear_implementation, unwrapped.config.moe_implementation = "torch", "auto"
            unwrapped.config.fp8_weight_cache = False
        save_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "final"))
        if metrics is not None and args.plots:
            plot_run(metrics.path, args.output_dir)
    if metrics is not None:
        metrics.close()
    accelerator.wait_for_everyone()
    return unwrapped


@contextlib.contextmanager
def _explain_oom(args: PretrainArguments):
    """Re-raise an out-of-memory error with what to change; the last checkpoint is untouched (saves are atomic)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(
            f"out of memory with per_device_batch_size={args.per_device_batch_size}, seq_len={args.seq_len}: lower "
            "--per-device-batch-size (raise --gradient-accumulation-steps to keep the global batch) or pass "
            f"--gradient-checkpointing; resume from the last checkpoint with --resume. ({e})"
        ) from e


def save_final(accelerator: Accelerator, model, tokenizer, folder: str) -> None:
    """The trained model in the official layout plus the tokenizer: from_pretrained / AutoModel / `dsv3 generate`."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        # Sharded parameters: gather a full state dict and save it from a plain copy of the model on rank 0.
        full = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            plain = DSV3ForCausalLM(unwrapped.config)
            plain.load_state_dict(full)
            plain.save_pretrained(folder)
    elif accelerator.is_main_process:
        unwrapped.save_pretrained(folder)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(argv if argv is not None else sys.argv[1:])
    train(args)
    if args.stop_at_step is None or args.stop_at_step >= args.max_steps:
        print(f"model: {os.path.join(args.output_dir, 'final')}  metrics and plots: {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
