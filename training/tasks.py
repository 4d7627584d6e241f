"""Verifiable tasks for GRPO (and SFT demos), offline: generated arithmetic word problems with exact answers, or a
GSM8K-format jsonl that the user supplies.

    from modeling_deepseek_v3.training.tasks import arithmetic_dataset, load_gsm8k_jsonl
    train = arithmetic_dataset(1000, level="medium", seed=0)   # columns: prompt, answer (and completion for SFT)
    train = load_gsm8k_jsonl("gsm8k/train.jsonl")               # {"question": ..., "answer": "... #### 72"} per line

Every row has `prompt` (a string, or a one-turn conversation with `chat=True`) and `answer` (the exact integer as
a string), which is what the reward functions in rewards.py read. Problems are generated from a seeded
`random.Random`, so the same seed gives the same dataset on every machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset

ANSWER_INSTRUCTION = "Give the final answer as a number after '####'."

# level -> (templates, operand range). {a}, {b}, {c} are filled in; `answer` computes the exact result.
_TEMPLATES = {
    "easy": [  # one step, single-digit sum: the answer (0-9) is a single token of the DeepSeek-V3 tokenizer
        ("What is {a} + {b}?", lambda a, b, c: a + b),
    ],
    "medium": [
        ("Tom has {a} apples and buys {b} more. How many apples does he have now?", lambda a, b, c: a + b),
        ("A shelf holds {a} books. {b} are taken away. How many books are left?", lambda a, b, c: a - b),
        ("Each box holds {a} pens. How many pens are in {b} boxes?", lambda a, b, c: a * b),
    ],
    "hard": [
        ("A farmer has {a} rows of {b} plants and {c} more plants by the fence. How many plants are there in all?",
         lambda a, b, c: a * b + c),
        ("Ann earns {a} dollars a day for {b} days and spends {c} dollars. How many dollars does she have left?",
         lambda a, b, c: a * b - c),
    ],
}  # fmt: skip


def _operands(level: str, rng: random.Random) -> tuple[int, int, int]:
    if level == "easy":
        a = rng.randint(0, 9)
        return a, rng.randint(0, 9 - a), 0
    if level == "medium":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return max(a, b), min(a, b), 0  # a - b stays non-negative
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return a, b, rng.randint(1, a * b)


def arithmetic_dataset(
    num_problems: int, level: str = "easy", seed: int = 0, chat: bool = False, instruction: bool = True
) -> Dataset:
    """`num_problems` generated word problems: columns prompt, answer, completion (the reference solution)."""
    if level not in _TEMPLATES:
        raise ValueError(f"unknown arithmetic level {level!r}; choose one of {sorted(_TEMPLATES)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_problems):
        template, solve = rng.choice(_TEMPLATES[level])
        a, b, c = _operands(level, rng)
        question = template.format(a=a, b=b, c=c)
        prompt = f"{question} {ANSWER_INSTRUCTION}" if instruction else question
        answer = str(solve(a, b, c))
        rows.append({"prompt": _as_chat(prompt) if chat else prompt, "answer": answer, "completion": f"#### {answer}"})
    if chat:
        for row in rows:
            row["completion"] = [{"role": "assistant", "content": row["completion"]}]
    return Dataset.from_list(rows)


def _as_chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load_gsm8k_jsonl(path: str | Path, chat: bool = False, instruction: bool = True) -> Dataset:
    """A GSM8K-format jsonl ({"question", "answer"} per line, the answer ending in '#### <number>') as prompt/answer.

    Raises ValueError naming the file, the line and what is wrong (missing column, no '####' final answer).
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
            missing = [key for key in ("question", "answer") if key not in record]
            if missing:
                raise ValueError(
                    f"{path}:{line_no}: GSM8K rows need the columns 'question' and 'answer'; missing {missing}, "
                    f"found {sorted(record)}"
                )
            solution = str(record["answer"])
            if "####" not in solution:
                raise ValueError(f"{path}:{line_no}: the answer has no final '#### <number>' line: {solution[-80:]!r}")
            answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
            prompt = f"{record['question']} {ANSWER_INSTRUCTION}" if instruction else record["question"]
            rows.append({"prompt": _as_chat(prompt) if chat else prompt, "answer": answer})
    if not rows:
        raise ValueError(f"{path}: no problems found")
    return Dataset.from_list(rows)


def require_columns(dataset: Dataset, required: list[str], what: str) -> None:
    """Raise ValueError naming the missing columns, the ones found and what needs them."""
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} needs the dataset columns {required}; missing {missing}, found {dataset.column_names}"
        )


__all__ = ["ANSWER_INSTRUCTION", "arithmetic_dataset", "load_gsm8k_jsonl", "require_columns"]
