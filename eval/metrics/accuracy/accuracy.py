"""Accuracy: the fraction of predictions equal to their reference (local copy: evaluate's own downloads from the Hub)."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predicted labels equal to the reference labels, optionally weighted per example."
_KWARGS = """
Args:
    predictions (list[int]): predicted labels.
    references (list[int]): gold labels.
    sample_weight (list[float], optional): per-example weights.
Returns:
    accuracy (float): in [0, 1].
Example:
    >>> evaluate.load("eval/metrics/accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        if not predictions:
            raise ValueError("accuracy of zero examples is undefined")
        weights = sample_weight or [1.0] * len(predictions)
        hits = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if p == r)
        return {"accuracy": float(hits / sum(weights))}
