"""Metric modules for `evaluate`, shipped with the package and loaded by local path (no Hub access)."""

from __future__ import annotations

from pathlib import Path

import datasets
import evaluate

METRICS_DIR = Path(__file__).parent


def label_metric_info(description: str, inputs_description: str) -> evaluate.MetricInfo:
    """``MetricInfo`` of a metric over integer ``predictions`` and ``references`` (the shipped modules')."""
    features = datasets.Features(
        {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
    )
    return evaluate.MetricInfo(
        description=description, citation="", inputs_description=inputs_description, features=features
    )


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a shipped metric module: ``"accuracy"`` or ``"f1"``.

    Example:
        >>> load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])
        {'accuracy': 0.5}
    """
    available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    if name not in available:
        raise ValueError(f"`name` must be one of {', '.join(available)}, got {name!r}.")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))
