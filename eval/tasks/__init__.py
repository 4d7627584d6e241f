"""Task registry and the `TYPE=PATH,key=value,...` spec parser used by `dsv3 eval --tasks`."""

from __future__ import annotations

from .base import Task, TaskError, TaskFileError
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .multiple_choice import ARC, MMLU
from .perplexity import Perplexity

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Perplexity, MMLU, ARC, GSM8K, HumanEval)}


def parse_spec(spec: str) -> Task:
    """'gsm8k=data/test.jsonl,num_fewshot=8,limit=50' -> a GSM8K task (not yet loaded).

    The first comma-separated item is TYPE or TYPE=PATH; the rest are the task's options.
    """
    head, *rest = spec.split(",")
    name, _, path = head.partition("=")
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    options = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq:
            raise TaskError(f"task {name}: option {item!r} is not key=value")
        options[key.strip()] = value.strip()
    return TASKS[name].from_options(path or None, options)


__all__ = ["TASKS", "Task", "TaskError", "TaskFileError", "parse_spec"]
