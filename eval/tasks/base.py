"""The common base of all tasks: options from a `TYPE=PATH,key=value` spec, file readers that name the bad line."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..lm import LM


class TaskError(ValueError):
    """A task that can't run as specified: unknown name or option, a missing or malformed file."""


class TaskFileError(TaskError):
    """A malformed task file; the message names the file, the line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        where = f"{path} line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = Path(path), line, problem


@dataclass
class Task:
    """One evaluation over one local file. Subclasses add options as dataclass fields and implement
    `load` (parse and validate the whole file, before any model is loaded) and `evaluate`."""

    name: ClassVar[str]
    requires_path: ClassVar[bool] = True

    path: Path | None = None
    limit: int | None = None  # evaluate only the first `limit` examples (smoke runs)
    seed: int = 0

    def load(self) -> None:
        """Read and validate the task file; raise TaskFileError on the first problem."""
        raise NotImplementedError

    def evaluate(self, lm: LM) -> dict[str, float]:
        """Run the model over the loaded examples; returns {metric name: value}."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The options as they ran, for the results JSON."""
        return {
            f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
            for f in dataclasses.fields(self)
            if f.repr
        }

    def _examples(self, items: list) -> list:
        return items[: self.limit] if self.limit is not None else items

    @classmethod
    def from_options(cls, path: str | None, options: dict[str, str]) -> Task:
        """Build from strings, converting each option to its field's type."""
        hints = typing.get_type_hints(cls)
        # repr=False marks loaded data (documents, questions), not options.
        fields = {f.name for f in dataclasses.fields(cls) if f.repr} - {"path"}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in fields:
                raise TaskError(f"task {cls.name}: unknown option {key!r} (options: {', '.join(sorted(fields))})")
            kwargs[key] = _convert(cls.name, key, raw, hints[key])
        if cls.requires_path and path is None:
            raise TaskError(f"task {cls.name} needs a file: {cls.name}=PATH")
        return cls(path=Path(path) if path is not None else None, **kwargs)


def _convert(task: str, key: str, raw: str, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if args else hint  # Optional[X] -> X
    try:
        if target is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if target is Path:
            return Path(raw)
        if typing.get_origin(target) is tuple:  # e.g. k=1;10 for pass@k
            return tuple(int(x) for x in raw.split(";"))
        return target(raw)
    except ValueError:
        raise TaskError(
            f"task {task}: option {key}={raw!r} is not a valid {getattr(target, '__name__', target)}"
        ) from None


def open_text(path: Path):
    """Open a text file, gunzipping `.gz`; a missing file is a TaskFileError rather than a traceback."""
    if not path.is_file():
        raise TaskFileError(path, None, "no such file")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; checks JSON syntax, object-ness and required keys."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskFileError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            if missing := [k for k in required if k not in obj]:
                raise TaskFileError(path, lineno, f"missing key(s) {', '.join(map(repr, missing))}")
            yield lineno, obj


def read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) for each CSV row; the line number is where the row starts (rows may span lines)."""
    with open_text(path) as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        except csv.Error as e:
            raise TaskFileError(path, reader.line_num, f"CSV error: {e}") from None
