"""Metric modules for `evaluate`, shipped with the package and loaded by local path (no Hub access)."""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


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
