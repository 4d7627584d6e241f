"""Metric modules as `evaluate.Metric` classes, one folder each, loaded from this package's path (never the Hub)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
NAMES = ("accuracy", "exact_match", "perplexity", "pass_at_k")


@cache
def load_metric(name: str):
    """`evaluate.load` on the local folder of `name`; works offline.

    Cached: evaluate copies the module into its cache and imports it on every load, which costs ~0.1 s.
    """
    import evaluate  # deferred: importing evaluate pulls in datasets, which the model side never needs

    if name not in NAMES:
        raise KeyError(f"unknown metric {name!r}; local metrics are {', '.join(NAMES)}")
    return evaluate.load(str(METRICS_DIR / name))
