"""Pretraining data: local files or the embedded corpus, tokenised, packed into fixed-length rows, served in a
seeded order from a resumable position.

- Local files (`--data-files a.jsonl "shards/*.parquet"`) go through `datasets.load_dataset` with `data_files`:
  .txt/.md (one document per file), .json/.jsonl, .parquet and .csv (a `text` column, or `--text-column`).
- The embedded default corpus (`stdlib_docstrings_corpus`) is real English prose that needs no download: the
  docstrings of the Python standard library's top-level modules, read from this interpreter's own source files
  with `ast` (nothing is imported or executed). The text is (c) the Python Software Foundation, under the PSF
  License Agreement (https://docs.python.org/3/license.html). It is about 0.7 MB (~170k tokens) and identical for a
  given Python version; another Python version ships slightly different docstrings.

Packing: documents are shuffled with the seed, tokenised without special tokens, each followed by EOS (so a row
may hold the end of one document, EOS, and the start of the next), concatenated, and cut into rows of `seq_len`
tokens (the tail shorter than one row is dropped). Labels are the inputs: the model shifts them.

Order: epoch e visits the rows in `randperm(num_rows, seed + e)`. `PackedDataset.position` counts the rows handed
out so far; it is all the state a resume needs (`state_dict`).
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import random
import sysconfig

import torch

BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@functools.cache
def stdlib_docstrings_corpus(min_chars: int = 200) -> tuple[str, ...]:
    """One document per top-level stdlib module: its docstring, then each public class/function docstring as
    "name: doc" in breadth-first AST order. Deterministic for a given Python version (sorted file names, no imports);
    cached because parsing ~150 files takes a second or more."""
    root = sysconfig.get_paths()["stdlib"]
    documents = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        parts = [ast.get_docstring(tree) or ""]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:  # skip one-liners like "Return self."
                    parts.append(f"{node.name}: {doc}")
        text = "\n\n".join(p for p in parts if p)
        if len(text) >= min_chars:
            documents.append(text)
    return tuple(documents)


def read_text_files(data_files: list[str], text_column: str = "text") -> list[str]:
    """Documents from local files through `datasets.load_dataset(builder, data_files=...)`; clear errors for
    missing files, unknown formats, a missing text column and empty data."""
    from datasets import load_dataset

    paths = []
    for pattern in data_files:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"data file not found: {pattern!r}")
        paths += matches
    kinds = {BUILDERS.get(os.path.splitext(p)[1].lower()) for p in paths}
    if None in kinds:
        bad = [p for p in paths if os.path.splitext(p)[1].lower() not in BUILDERS]
        raise ValueError(f"unsupported data file type: {bad[0]!r} (supported: {', '.join(BUILDERS)})")
    if len(kinds) > 1:
        raise ValueError(f"data files mix formats {sorted(kinds)}; pass one kind at a time")
    builder = kinds.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        dataset = load_dataset(builder, data_files=paths, split="train", **kwargs)
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise ValueError(f"could not read data files {paths}: {type(e).__name__}: {e}") from e
    if text_column not in dataset.column_names:
        raise ValueError(f"data files {paths} have no column {text_column!r} (columns: {dataset.column_names})")
    documents = [t for t in dataset[text_column] if t and t.strip()]
    if not documents:
        raise ValueError(f"data files {paths} hold no text (empty dataset)")
    return documents


class PackedDataset:
    """Rows of `seq_len` token ids [num_rows, seq_len] and a resumable, seeded order over them."""

    def __init__(self, documents: list[str], tokenizer, seq_len: int, seed: int = 0, vocab_size: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to mark document boundaries")
        documents = list(documents)
        random.Random(seed).shuffle(documents)
        ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
        stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
        num_rows = len(stream) // seq_len
        if num_rows == 0:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}")
        self.rows = torch.tensor(stream[: num_rows * seq_len], dtype=torch.long).view(num_rows, seq_len)
        if vocab_size is not None and int(self.rows.max()) >= vocab_size:
            raise ValueError(
                f"token id {int(self.rows.max())} does not fit the model's vocab_size={vocab_size}; "
                f"the tokenizer has {len(tokenizer)} tokens"
            )
        self.seq_len, self.seed, self.position = seq_len, seed, 0
        self.fingerprint = hashlib.sha256(self.rows.numpy().tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rows.numel()

    def next_rows(self, n: int) -> torch.Tensor:
        """The next n rows of the seeded order [n, seq_len], crossing into the next epoch when needed."""
        picked = []
        for _ in range(n):
            epoch, index = divmod(self.position, len(self))
            if index == 0 or not hasattr(self, "_order") or self._epoch != epoch:
                self._epoch = epoch
                self._order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))
            picked.append(self._order[index])
            self.position += 1
        return self.rows[torch.stack(picked)]

    def state_dict(self) -> dict:
        return {"position": self.position, "fingerprint": self.fingerprint, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint or state["seq_len"] != self.seq_len:
            raise ValueError(
                "the checkpoint was written for different data (other files, seed, seq_len or tokenizer); "
                "resume with the arguments of the original run"
            )
        self.position = state["position"]


def build_dataset(
    tokenizer, seq_len: int, data_files: list[str] | None = None, text_column: str = "text", seed: int = 0,
    vocab_size: int | None = None,
) -> PackedDataset:
    documents = read_text_files(data_files, text_column) if data_files else stdlib_docstrings_corpus()
    return PackedDataset(documents, tokenizer, seq_len, seed=seed, vocab_size=vocab_size)
