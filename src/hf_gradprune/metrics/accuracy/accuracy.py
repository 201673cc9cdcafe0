"""Accuracy as an `evaluate` metric module, shipped so that no metric is fetched from the Hub."""

import evaluate

from hf_gradprune.metrics import label_metric_info

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
Returns:
    accuracy (`float`): in [0, 1].
Example:
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return label_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        if not references:
            raise ValueError("`references` is empty: accuracy needs at least one example.")
        return {
            "accuracy": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)
        }
