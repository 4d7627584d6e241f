"""GSM8K-format generation: jsonl lines {"question": ..., "answer": "... #### 42"}, few-shot, exact match.

Prompts are "Question: ...\\nAnswer: <worked solution> #### N" shots followed by the question, as in lm-eval's
gsm8k task; generation stops at the next "Question:". Two scores, as lm-eval reports them: `exact_match` takes the
number after "####" (strict: the model must follow the format), `exact_match_flexible` the last number in the output.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..lm import LM
from ..metrics import load_metric
from .base import Task, TaskFileError, read_jsonl

STRICT = re.compile(r"####\s*(-?[$0-9.,]+)")
NUMBER = re.compile(r"-?[$0-9.,]*[0-9]+")
STOP = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>")


def normalise_number(s: str) -> str:
    """'$1,234.' -> '1234': the formatting GSM8K answers and model outputs disagree on."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")  # '12.50' == '12.5', '12.0' == '12'
    return s


def extract_answer(text: str, strict: bool = True) -> str:
    """The number after '####' (strict) or the last number in the text (flexible); '' when there is none."""
    if strict:
        m = STRICT.search(text)
        return normalise_number(m.group(1)) if m else ""
    found = NUMBER.findall(text)
    return normalise_number(found[-1]) if found else ""


@dataclass
class Example:
    question: str
    answer: str  # the full worked solution, ending '#### N'
    target: str  # N, normalised


@dataclass
class GSM8K(Task):
    name = "gsm8k"

    num_fewshot: int = 5
    fewshot: Path | None = None  # solved examples (train split), else the other questions of the same file
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    examples: list[Example] = field(default_factory=list, repr=False)
    shots: list[Example] = field(default_factory=list, repr=False)

    @staticmethod
    def parse(path: Path) -> list[Example]:
        out = []
        for lineno, obj in read_jsonl(path, required=("question", "answer")):
            if not isinstance(obj["question"], str) or not isinstance(obj["answer"], str):
                raise TaskFileError(path, lineno, '"question" and "answer" must be strings')
            if not (target := extract_answer(obj["answer"])):
                raise TaskFileError(path, lineno, 'answer has no final "#### N"')
            out.append(Example(obj["question"].strip(), obj["answer"].strip(), target))
        return out

    def load(self) -> None:
        self.examples = self.parse(self.path)
        if not self.examples:
            raise TaskFileError(self.path, None, "no examples")
        self.shots = self.parse(self.fewshot) if self.fewshot is not None else self.examples
        if self.num_fewshot and len(self.shots) <= self.num_fewshot - (self.fewshot is not None):
            raise TaskFileError(
                self.fewshot or self.path, None, f"too few examples for {self.num_fewshot}-shot prompts"
            )

    def build_prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        prompts = []
        for ex in self._examples(self.examples):
            shots = rng.sample([s for s in self.shots if s is not ex], self.num_fewshot) if self.num_fewshot else []
            context = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
            prompts.append(f"{context}Question: {ex.question}\nAnswer:")
        return prompts

    def evaluate(self, lm: LM) -> dict[str, float]:
        examples = self._examples(self.examples)
        prompts = [
            [lm.tokenizer.bos_token_id] + lm.tokenizer(p, add_special_tokens=False).input_ids
            for p in self.build_prompts()
        ]
        outputs = lm.generate(
            prompts,
            self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=STOP,
            desc=self.name,
        )
        targets = [ex.target for ex in examples]
        em = load_metric("exact_match")
        strict = [extract_answer(o[0], strict=True) for o in outputs]
        flexible = [extract_answer(o[0], strict=False) for o in outputs]
        return {
            "exact_match": em.compute(predictions=strict, references=targets)["exact_match"],
            "exact_match_flexible": em.compute(predictions=flexible, references=targets)["exact_match"],
        }
