"""Exact match of strings after optional normalisation (local copy: evaluate's own downloads from the Hub)."""

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions identical to their reference after the chosen normalisation."
_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
    regexes_to_ignore (list[str], optional): removed from both sides before comparing.
    ignore_case (bool), ignore_punctuation (bool), ignore_numbers (bool): default False.
Returns:
    exact_match (float): in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
    ):
        if not predictions:
            raise ValueError("exact match of zero examples is undefined")

        def normalise(s: str) -> str:
            for pattern in regexes_to_ignore or []:
                s = re.sub(pattern, "", s)
            if ignore_case:
                s = s.lower()
            if ignore_punctuation:
                s = s.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                s = s.translate(str.maketrans("", "", string.digits))
            return s

        hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / len(predictions)}
