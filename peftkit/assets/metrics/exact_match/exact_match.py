"""Exact-match metric shipped with peftkit for offline use.

Load it with ``evaluate.load("<path>/exact_match.py")``; the Hub's
``exact_match`` is not needed. Predictions and references are compared after
``str.strip()``; the score is the fraction of exact matches (0.0 for no inputs).
"""

import datasets
import evaluate

_DESCRIPTION = """\
Fraction of predictions that equal their reference exactly, after stripping
leading and trailing whitespace from both.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted strings.
    references (list of str): reference strings, same length as predictions.
Returns:
    exact_match (float): fraction in [0, 1] of stripped predictions equal to
        their stripped reference.
Examples:
    >>> metric = evaluate.load("peftkit/assets/metrics/exact_match/exact_match.py")
    >>> metric.compute(predictions=["1 2 3", " x b q\\n"], references=["1 2 3", "x b a"])
    {'exact_match': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            return {"exact_match": 0.0}
        matches = sum(
            str(p).strip() == str(r).strip() for p, r in zip(predictions, references)
        )
        return {"exact_match": matches / len(predictions)}
