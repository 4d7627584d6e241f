"""Reward functions for GRPO on verifiable tasks (tasks.py), in TRL's calling convention:
`fn(prompts, completions, **columns) -> list[float | None]`, one reward per completion.

- correctness_reward: 1.0 when the completion's final answer equals the row's `answer` exactly, else 0.0. The final
  answer is the number after the last '####' if there is one, else the last number in the completion (GSM8K's
  convention). Commas inside numbers are ignored; numbers compare as exact decimals, so "7.0" equals "7".
- format_reward: 1.0 when the final answer can be read without guessing: the completion is a single number, or its
  last line is '#### <number>'; else 0.0.

`checked(fn)` wraps any reward function (TRL's trainers call them bare): an exception, a wrong number of rewards or
a non-numeric reward becomes an error that names the function and the problem.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)
_WELL_FORMED = re.compile(r"^\s*(?:" + _NUMBER + r"|(?:[\s\S]*\n)?\s*####\s*" + _NUMBER + r")\s*$")


def completion_text(completion) -> str:
    """The text of a completion: a string, or the last message's content in conversational format."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring), without commas; None if it has no number."""
    final = _FINAL.findall(text)
    numbers = final or _ANY.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _same_number(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b.replace(",", "").strip())
    except InvalidOperation:
        return False


def correctness_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 for an exactly right final answer, else 0.0 (needs the dataset column `answer`)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if predicted is not None and _same_number(predicted, str(expected)) else 0.0)
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is one number or ends with a '#### <number>' line, else 0.0."""
    return [1.0 if _WELL_FORMED.match(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCTIONS = {"correctness": correctness_reward, "format": format_reward}


def checked(fn: Callable) -> Callable:
    """`fn` with errors that name it: exceptions, a reward count unlike the completion count, non-numeric values."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
        try:
            rewards = fn(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(f"reward function {fn.__name__!r} raised {type(err).__name__}: {err}") from err
        if completions is not None and len(rewards) != len(completions):
            raise ValueError(
                f"reward function {fn.__name__!r} returned {len(rewards)} rewards for {len(completions)} completions"
            )
        bad = [r for r in rewards if r is not None and not isinstance(r, numbers.Real)]
        if bad:
            raise TypeError(f"reward function {fn.__name__!r} returned non-numeric rewards, e.g. {bad[0]!r}")
        return rewards

    return wrapper


__all__ = ["REWARD_FUNCTIONS", "checked", "completion_text", "correctness_reward", "extract_answer", "format_reward"]
