"""Perplexity over local text: a .txt file is one document, a directory is one document per *.txt file, and a
.jsonl file is one document per line ({"text": ...}).

Long documents are scored with sliding windows (Press et al.'s strided evaluation): each window holds at most
`max_length` tokens, advances by `stride`, and scores only the tokens no earlier window scored, with the rest of the
window as context. Every token after BOS is scored exactly once, so the corpus perplexity is exp(total NLL / tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lm import LM
from ..metrics import load_metric
from .base import Task, TaskError, TaskFileError, open_text, read_jsonl


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window over a document of n_tokens (BOS included, never scored)."""
    if not 1 <= stride < max_length:
        raise TaskError(f"perplexity: need 1 <= stride < max_length, got stride={stride}, max_length={max_length}")
    out, begin, scored_to = [], 0, 1
    while scored_to < n_tokens:
        end = min(begin + max_length, n_tokens)
        out.append((begin, scored_to, end))
        scored_to = end
        begin += stride
    return out


@dataclass
class Perplexity(Task):
    name = "perplexity"

    max_length: int | None = None  # default: min(2048, the model's max_position_embeddings)
    stride: int | None = None  # default: max_length // 2
    documents: list[str] = field(default_factory=list, repr=False)

    def load(self) -> None:
        path = self.path
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise TaskFileError(path, None, "directory has no *.txt files")
            self.documents = [open_text(p).read() for p in files]
        elif path.suffix == ".jsonl":
            self.documents = []
            for lineno, obj in read_jsonl(path, required=("text",)):
                if not isinstance(obj["text"], str):
                    raise TaskFileError(path, lineno, '"text" must be a string')
                self.documents.append(obj["text"])
        else:
            self.documents = [open_text(path).read()]
        if not any(d.strip() for d in self.documents):
            raise TaskFileError(path, None, "no text to score")

    def evaluate(self, lm: LM) -> dict[str, float]:
        max_length = self.max_length or min(2048, lm.max_length)
        stride = self.stride or max_length // 2
        docs = [d for d in self._examples(self.documents) if d.strip()]
        nll, counts = [], []
        for doc in docs:
            ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(doc, add_special_tokens=False).input_ids
            reqs = [(ids[b:s], ids[s:e]) for b, s, e in windows(len(ids), max_length, stride)]
            scores = lm.loglikelihood(reqs, desc=f"{self.name}")
            nll.append(-sum(score for score, _ in scores))
            counts.append(len(ids) - 1)
        return load_metric("perplexity").compute(nll=nll, num_tokens=counts)
