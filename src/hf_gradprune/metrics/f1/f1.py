"""F1 as an `evaluate` metric module (binary or macro), shipped so that nothing is fetched from the Hub."""

import evaluate

from hf_gradprune.metrics import label_metric_info

_DESCRIPTION = "F1: the harmonic mean of precision and recall."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
    average (`str`, *optional*, defaults to `"binary"`): `"binary"` (class `pos_label`) or `"macro"`.
    pos_label (`int`, *optional*, defaults to 1): the positive class of `"binary"`.
Returns:
    f1 (`float`): in [0, 1].
Example:
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""

AVERAGES = ("binary", "macro")


def _f1(predictions: list[int], references: list[int], label: int) -> float:
    tp = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
    fp = sum(p == label and r != label for p, r in zip(predictions, references, strict=True))
    fn = sum(p != label and r == label for p, r in zip(predictions, references, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return label_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(
        self, predictions: list[int], references: list[int], average: str = "binary", pos_label: int = 1
    ) -> dict[str, float]:
        if average not in AVERAGES:
            raise ValueError(f"`average` must be one of {', '.join(AVERAGES)}, got {average!r}.")
        if average == "binary":
            return {"f1": _f1(predictions, references, pos_label)}
        labels = sorted(set(references) | set(predictions))
        return {"f1": sum(_f1(predictions, references, label) for label in labels) / len(labels)}
