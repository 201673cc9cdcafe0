"""The causal-LM example's table with the cost of every criterion: wall time and peak memory of its scoring
pass, and the perplexity at 50% per row, 50% per tensor and 2:4, on SmolLM2-135M (float32).

Each criterion is scored alone, in its own pass over the calibration batches of
``examples/causal_lm_pruning.py`` (same text, same settings). Peak memory is sampled from the process's
resident set every 2 ms during the pass and reported above what the process held before it, as a multiple
of the float32 model's size (``extra``), and with the model itself (``total``). Layer by layer (block by
block, with SparseGPT, reconstructions and OWL): ``benchmarks/llm_blockwise.py``.

Run: ``.venv/bin/python benchmarks/llm.py`` (``--quick`` for a smoke run). Writes ``results/llm.{json,png}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import compute_weight_importance, compute_weight_masks
from hf_gradprune.core.adapters import weight_input_dims

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, results_header, smollm2_perplexity_setup, write_results

NAME = "llm"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/weights/criteria.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/weights/sparsity.py",
)


def main() -> None:
    started = time.perf_counter()
    args, run = smollm2_perplexity_setup(__doc__)
    example, model, model_bytes = run.example, run.model, run.model_bytes
    calibration, held_out = run.calibration, run.held_out
    dims = weight_input_dims(model)
    rows = [
        {
            "criterion": "dense",
            **{label: example.perplexity(model, held_out) for label, *_ in example.PATTERNS},
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    for criterion in example.CRITERIA:
        data = None if criterion == "magnitude" else calibration
        with PeakMemory() as memory:
            start = time.perf_counter()
            scores = compute_weight_importance(model, data, method=criterion, show_progress=False)
            seconds = time.perf_counter() - start
        row = {
            "criterion": criterion,
            "seconds": seconds,
            "extra_memory": (memory.peak - memory.start) / model_bytes,
        }
        for label, sparsity, scope, pattern in example.PATTERNS:
            masks = compute_weight_masks(
                scores,
                sparsity,
                scope=scope,
                pattern=pattern,
                input_dims=dims if scope == "per_row" or pattern != "unstructured" else None,
            )
            row[label] = example.with_masks(model, masks, lambda m: example.perplexity(m, held_out))
        del scores
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {
        **results_header(NAME, args),
        "model_bytes": model_bytes,
        "rows": rows,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    labels = [label for label, *_ in example.PATTERNS]
    print("\n| criterion | " + " | ".join(labels) + " | scoring s | peak memory (x fp32 model) |")
    print("|---|" + "---:|" * (len(labels) + 2))
    for row in rows:
        cells = [f"{row[label]:.1f}" if label in row else "–" for label in labels]
        cost = f"{row['seconds']:.0f} | {row['extra_memory']:.2f} extra" if "seconds" in row else "– | –"
        print(f"| {row['criterion']} | " + " | ".join(cells) + f" | {cost} |")


def plot(results: dict, path: Path) -> None:
    rows = [r for r in results["rows"] if "50% per row" in r]
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(rows))
    axes.bar(positions, [r["50% per row"] for r in rows], color="tab:blue")
    axes.set_yscale("log")
    axes.set_xticks(list(positions), [r["criterion"] for r in rows], fontsize=7, rotation=20)
    axes.set_ylabel("perplexity on held-out reviews (log)")
    axes.set_title("SmolLM2-135M, 50% of every attention and MLP matrix pruned per row, no retraining")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
