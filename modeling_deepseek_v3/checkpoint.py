"""Checkpoint I/O in DeepSeek-V3's official layout.

The official safetensors (and those transformers' built-in class saves) name every expert separately and store
the MTP module as one more decoder layer at index num_hidden_layers. Our model fuses each layer's experts into two
3-D tensors and keeps MTP modules in `model.mtp_layers`. `official_layout` is the one key-mapping table between the
two; loading and saving both read it, so a round trip is exact by construction (and tested).

Official FP8 checkpoints store e4m3 weights with `weight_scale_inv` over 128x128 blocks; they are dequantised here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .configuration_dsv3 import DSV3Config

FP8_BLOCK = 128
# Official per-expert names -> (fused parameter, which half of gate_up_proj or the whole down_proj).
_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Slot:
    """Where an official tensor lives inside our state dict: `internal[key][index]`.

    `alias_of_main` marks the MTP layer's copies of the shared embedding / output head: they load by checking
    equality with the main tensor (the paper shares them) and save as copies, so nothing is dropped either way.
    """

    key: str
    index: tuple = ()
    alias_of_main: bool = False


def official_layout(model: torch.nn.Module) -> dict[str, Slot]:
    """Official checkpoint key -> Slot, for every tensor the model holds."""
    config: DSV3Config = model.config
    prefix = "model." if hasattr(model, "model") else ""  # DSV3ForCausalLM vs DSV3Model
    F_ = config.moe_intermediate_size
    layout: dict[str, Slot] = {}
    for key in model.state_dict():
        official = key if prefix else "model." + key
        m = re.match(r"^model\.mtp_layers\.(\d+)\.(.*)$", official)
        if m:
            official = f"model.layers.{config.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
        if official.endswith(".mlp.experts.gate_up_proj"):
            base = official.removesuffix(".gate_up_proj")
            for e in range(config.n_routed_experts):
                layout[f"{base}.{e}.gate_proj.weight"] = Slot(key, (e, slice(0, F_)))
                layout[f"{base}.{e}.up_proj.weight"] = Slot(key, (e, slice(F_, 2 * F_)))
        elif official.endswith(".mlp.experts.down_proj"):
            base = official.removesuffix(".down_proj")
            for e in range(config.n_routed_experts):
                layout[f"{base}.{e}.down_proj.weight"] = Slot(key, (e,))
        elif official.endswith(".mlp.experts.gate_up_proj_scale_inv"):  # FP8 storage: scale blocks per expert
            base, Fb = official.removesuffix(".gate_up_proj_scale_inv"), F_ // FP8_BLOCK
            for e in range(config.n_routed_experts):
                layout[f"{base}.{e}.gate_proj.weight_scale_inv"] = Slot(key, (e, slice(0, Fb)))
                layout[f"{base}.{e}.up_proj.weight_scale_inv"] = Slot(key, (e, slice(Fb, 2 * Fb)))
        elif official.endswith(".mlp.experts.down_proj_scale_inv"):
            base = official.removesuffix(".down_proj_scale_inv")
            for e in range(config.n_routed_experts):
                layout[f"{base}.{e}.down_proj.weight_scale_inv"] = Slot(key, (e,))
        elif official == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: stored once, as the embedding
        else:
            layout[official] = Slot(key)
    for k in range(config.num_nextn_predict_layers):
        mtp = f"model.layers.{config.num_hidden_layers + k}"
        layout[f"{mtp}.embed_tokens.weight"] = Slot(prefix + "embed_tokens.weight", alias_of_main=True)
        if prefix:
            head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            layout[f"{mtp}.shared_head.head.weight"] = Slot(head, alias_of_main=True)
    return layout


# ------------------------------------------------------------------------------------------------------ reading
def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder} holds no model.safetensors or model.safetensors.index.json")


def dequantize_fp8_blocks(weight_NK: torch.Tensor, scale_inv_nk: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w = w_fp8 * scale_inv per 128x128 block; scale_inv is [ceil(N/128), ceil(K/128)] (ragged edges allowed)."""
    N, K = weight_NK.shape
    scale = scale_inv_nk.float().repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]
    return (weight_NK.float() * scale).to(dtype)


def load_official_state_dict(model: torch.nn.Module, folder: str) -> dict:
    """Copy an official-layout checkpoint into `model` (in place). Raises on missing, unexpected or mis-shaped keys.

    Returns loading info: {"missing_keys": [], "unexpected_keys": [...ignored on purpose...], "mismatched_keys": []}.
    """
    layout = official_layout(model)
    internal = model.state_dict()
    has_head = "lm_head.weight" in internal or hasattr(model, "lm_head")
    missing = set(layout)
    unexpected, mismatched, ignored, aliases = [], [], [], {}
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                slot = layout.get(name)
                if name.endswith(".weight_scale_inv") and slot is None:  # consumed by dequantising its weight
                    if name.removesuffix("_scale_inv") not in names:
                        unexpected.append(name)
                    continue
                if slot is None:
                    if not has_head and (name == "lm_head.weight" or name.endswith(".shared_head.head.weight")):
                        ignored.append(name)  # a base model has no output head
                    else:
                        unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                target = internal[slot.key][slot.index] if slot.index else internal[slot.key]
                if name + "_scale_inv" in names and target.dtype != torch.float8_e4m3fn:
                    tensor = dequantize_fp8_blocks(tensor, f.get_tensor(name + "_scale_inv"))
                missing.discard(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                    continue
                if slot.alias_of_main:
                    aliases[name] = (slot.key, tensor)
                else:
                    with torch.no_grad():
                        target.copy_(tensor)
    for name, (key, tensor) in aliases.items():
        if not torch.equal(tensor.to(internal[key].dtype), internal[key].to(tensor.device)):
            mismatched.append(f"{name}: differs from {key}; the MTP module shares the main embedding and head")
    _raise_on_problems(folder, model.config, sorted(missing), unexpected, mismatched)
    return {"missing_keys": [], "unexpected_keys": ignored, "mismatched_keys": []}


def _raise_on_problems(folder, config, missing, unexpected, mismatched, limit=20) -> None:
    if not (missing or unexpected or mismatched):
        return

    def listing(title, keys):
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"\n  {title} ({len(keys)}):\n    " + "\n    ".join(keys[:limit]) + more if keys else ""

    hint = ""
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    if missing and all(k.startswith("model.layers.") and int(k.split(".")[2]) >= config.num_hidden_layers for k in missing):
        hint = (f"\n  The checkpoint has no MTP weights ({mtp_prefix}*), e.g. it was saved by transformers' built-in "
                "DeepseekV3, which drops them. Pass num_nextn_predict_layers=0 to load it without MTP.")
    raise ValueError(
        f"Checkpoint {folder} does not match the model:"
        + listing("missing keys", missing)
        + listing("unexpected keys", sorted(unexpected))
        + listing("mis-shaped keys", mismatched)
        + hint
    )


# ------------------------------------------------------------------------------------------------------ writing
def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under official names, each its own contiguous copy (safetensors refuses shared storage)."""
    internal = model.state_dict()
    out = {}
    for name, slot in official_layout(model).items():
        tensor = internal[slot.key][slot.index] if slot.index else internal[slot.key]
        out[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def save_pretrained(model, save_directory: str, max_shard_size: int | str = "5GB", is_main_process: bool = True, **kwargs):
    """Write config.json, generation_config.json and sharded safetensors (with an index) in the official layout."""
    from huggingface_hub import save_torch_state_dict

    for unsupported in ("push_to_hub", "safe_serialization"):
        if kwargs.pop(unsupported, None) not in (None, True, False):
            raise ValueError(f"save_pretrained: unsupported {unsupported}")
    if kwargs.get("state_dict") is not None:
        raise ValueError("save_pretrained writes the model's own tensors; a custom state_dict is not supported")
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(save_directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    state = official_state_dict(model)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(save_directory, stale)):
            os.remove(os.path.join(save_directory, stale))
    save_torch_state_dict(state, save_directory, max_shard_size=max_shard_size, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------------ loading
_LOADER_KWARGS_IGNORED = (
    "trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "_from_auto", "_from_pipeline", "code_revision",
    "adapter_kwargs", "adapter_name", "offload_state_dict", "use_flash_attention_2", "key_mapping",
)  # fmt: skip
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def resolve_folder(name_or_path: str, hub_kwargs: dict) -> str:
    if os.path.isdir(name_or_path):
        return os.path.join(name_or_path, hub_kwargs.get("subfolder") or "")
    from huggingface_hub import snapshot_download

    subfolder = hub_kwargs.pop("subfolder", None)
    folder = snapshot_download(
        name_or_path,
        allow_patterns=["*.json", "*.safetensors", "*.py", "*.model", "*.txt"],
        **{k: v for k, v in hub_kwargs.items() if v is not None},
    )
    return os.path.join(folder, subfolder or "")


def resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise NotImplementedError("device_map spreading one model over several devices is not supported; "
                                      "use accelerate/FSDP for that. Give one device, e.g. device_map='cuda'.")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


def resolve_dtype(dtype, config: DSV3Config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = getattr(torch, saved)
        if config.quantization_config is not None:
            return torch.bfloat16  # FP8 checkpoints dequantise to their training dtype
        return saved if isinstance(saved, torch.dtype) else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_pretrained(cls, name_or_path: str, *model_args, **kwargs):
    """`from_pretrained` for the DSV3 classes.

    Accepts transformers' usual keywords (config, dtype/torch_dtype, device_map, attn_implementation,
    experts_implementation, output_loading_info, revision/cache_dir/token/local_files_only); any other keyword
    overrides a config field (e.g. num_nextn_predict_layers=0). Weights are created on the meta device and then
    filled from the checkpoint, so nothing is initialised twice.
    """
    from transformers import GenerationConfig

    from .modeling_dsv3 import DSV3RotaryEmbedding, use_fp8_weight_storage

    if model_args:
        raise TypeError("from_pretrained takes no positional arguments besides the path")
    for name in _LOADER_KWARGS_IGNORED:
        kwargs.pop(name, None)
    if kwargs.pop("quantization_config", None) is not None:
        raise NotImplementedError("quantization_config at load time is not supported; FP8 comes from the checkpoint")
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    folder = resolve_folder(str(name_or_path), hub_kwargs)
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    kwargs.pop("torch_dtype", None)
    device = resolve_device(kwargs.pop("device_map", None))
    attn = kwargs.pop("attn_implementation", None)
    experts = kwargs.pop("experts_implementation", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    if config is None:
        config = DSV3Config.from_pretrained(folder, **kwargs)
    else:
        for key, value in kwargs.items():
            setattr(config, key, value)
        config.validate()
    if experts is not None:
        config.moe_implementation = experts
        config.validate()
    if attn is not None:
        config._attn_implementation = attn
    torch_dtype = resolve_dtype(dtype, config)
    config.dtype = torch_dtype

    with torch.device("meta"):
        model = cls(config)
    model.to(torch_dtype)
    if config.quantization_config is not None:
        use_fp8_weight_storage(model)  # keeps the checkpoint's e4m3 weights where FP8 compute was asked for
    model.to_empty(device=device)
    info = load_official_state_dict(model, folder)
    for module in model.modules():  # non-persistent buffers are not in the checkpoint
        if isinstance(module, DSV3RotaryEmbedding):
            module.reset_parameters()
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(config)
    model.config.name_or_path = str(name_or_path)
    model.eval()
    return (model, info) if output_loading_info else model
