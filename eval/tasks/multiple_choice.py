"""Multiple choice by log-likelihood: MMLU's CSV and ARC's jsonl, k-shot.

Each choice is scored as the continuation of the prompt; the prediction is the choice with the highest summed
log-probability (accuracy), or the highest log-probability per byte of the choice (accuracy_norm, lm-eval's
acc_norm: it removes the bias towards short answers).

MMLU CSV rows are `question,A,B,C,D,answer` (answer a letter; no header, as in the released data, though a header row
is skipped). The choices are scored as the letters " A".." D" after the lettered options, as MMLU's paper does.
ARC jsonl accepts the released format ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}) and
the Hugging Face one ({"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}); choices are
scored as their text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..lm import LM
from ..metrics import load_metric
from .base import Task, TaskFileError, read_csv, read_jsonl

LETTERS = "ABCD"


@dataclass
class Question:
    """A prompt without the answer, the choices as continuations, the gold index and a few-shot rendering."""

    prompt: str
    choices: list[str]
    gold: int
    shot: str  # prompt + gold continuation, as a solved example for other questions


@dataclass
class MultipleChoice(Task):
    """Common scoring; subclasses parse their format into Questions."""

    num_fewshot: int = 0
    fewshot: Path | None = None  # solved examples come from here, else from the other questions of the same file
    header: str = ""
    questions: list[Question] = field(default_factory=list, repr=False)
    shots: list[Question] = field(default_factory=list, repr=False)

    def parse(self, path: Path) -> list[Question]:
        raise NotImplementedError

    def load(self) -> None:
        self.questions = self.parse(self.path)
        if not self.questions:
            raise TaskFileError(self.path, None, "no questions")
        self.shots = self.parse(self.fewshot) if self.fewshot is not None else self.questions
        if self.num_fewshot and len(self.shots) <= self.num_fewshot - (self.fewshot is not None):
            raise TaskFileError(
                self.fewshot or self.path, None, f"too few examples for {self.num_fewshot}-shot prompts"
            )

    def build_prompts(self) -> list[str]:
        """Few-shot context + question for each evaluated question; shots drawn with a seeded RNG, never the
        question itself."""
        rng = random.Random(self.seed)
        prompts = []
        for q in self._examples(self.questions):
            pool = [s for s in self.shots if s is not q]
            shots = rng.sample(pool, self.num_fewshot) if self.num_fewshot else []
            prompts.append(self.header + "".join(s.shot + "\n\n" for s in shots) + q.prompt)
        return prompts

    def evaluate(self, lm: LM) -> dict[str, float]:
        questions = self._examples(self.questions)
        encode = lambda s: lm.tokenizer(s, add_special_tokens=False).input_ids
        requests, owners = [], []
        for qi, (q, prompt) in enumerate(zip(questions, self.build_prompts(), strict=True)):
            ctx = [lm.tokenizer.bos_token_id] + encode(prompt)
            for choice in q.choices:
                requests.append((ctx, encode(choice)))
                owners.append(qi)
        scores = [s for s, _ in lm.loglikelihood(requests, desc=self.name)]
        pred, pred_norm = pick(questions, scores)
        golds = [q.gold for q in questions]
        acc = load_metric("accuracy")
        return {
            "accuracy": acc.compute(predictions=pred, references=golds)["accuracy"],
            "accuracy_norm": acc.compute(predictions=pred_norm, references=golds)["accuracy"],
        }


def pick(questions: list[Question], scores: list[float]) -> tuple[list[int], list[int]]:
    """argmax of log-likelihood and of log-likelihood per byte, per question; `scores` are flat in choice order."""
    pred, pred_norm, k = [], [], 0
    for q in questions:
        s = scores[k : k + len(q.choices)]
        per_byte = [x / max(1, len(c.encode())) for x, c in zip(s, q.choices, strict=True)]
        pred.append(max(range(len(s)), key=s.__getitem__))
        pred_norm.append(max(range(len(s)), key=per_byte.__getitem__))
        k += len(q.choices)
    return pred, pred_norm


@dataclass
class MMLU(MultipleChoice):
    name = "mmlu"
    subject: str = ""  # e.g. "high school physics"; fills MMLU's header line

    def __post_init__(self):
        if self.subject and not self.header:
            self.header = f"The following are multiple choice questions (with answers) about {self.subject}.\n\n"

    def parse(self, path: Path) -> list[Question]:
        out = []
        for lineno, row in read_csv(path):
            if lineno == 1 and [c.strip().lower() for c in row] == ["question", "a", "b", "c", "d", "answer"]:
                continue
            if not row:
                continue
            if len(row) != 6:
                raise TaskFileError(path, lineno, f"expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                raise TaskFileError(path, lineno, f"answer must be one of A, B, C, D, got {row[5]!r}")
            body = row[0].strip() + "".join(f"\n{L}. {row[i + 1].strip()}" for i, L in enumerate(LETTERS))
            prompt = body + "\nAnswer:"
            out.append(Question(prompt, [f" {L}" for L in LETTERS], LETTERS.index(answer), f"{prompt} {answer}"))
        return out


@dataclass
class ARC(MultipleChoice):
    name = "arc"

    def parse(self, path: Path) -> list[Question]:
        out = []
        for lineno, obj in read_jsonl(path, required=("question", "answerKey")):
            q = obj["question"]
            try:
                if isinstance(q, dict):  # released ARC: choices inside the question
                    stem, texts, labels = (
                        q["stem"],
                        [c["text"] for c in q["choices"]],
                        [c["label"] for c in q["choices"]],
                    )
                else:  # Hugging Face ARC
                    stem, texts, labels = q, obj["choices"]["text"], obj["choices"]["label"]
            except (KeyError, TypeError) as e:
                raise TaskFileError(path, lineno, f"choices not in ARC format (missing {e})") from None
            if len(texts) < 2 or len(texts) != len(labels):
                raise TaskFileError(
                    path, lineno, f"need >= 2 choices with one label each, got {len(texts)} / {len(labels)}"
                )
            key = str(obj["answerKey"])
            if key not in labels:
                raise TaskFileError(path, lineno, f"answerKey {key!r} is not one of the labels {labels}")
            prompt = f"Question: {stem.strip()}\nAnswer:"
            gold = labels.index(key)
            out.append(Question(prompt, [f" {t.strip()}" for t in texts], gold, f"{prompt} {texts[gold].strip()}"))
        return out
