"""Layer by layer on SmolLM2-135M (float32): SparseGPT, Wanda and GBLM block by block, with and without the
reconstructions, uniform and OWL's sparsity per block, at 50%, 60% and 70% per row and 2:4, beside the
dense model and one-shot Wanda (its scores and masks timed the same way: the control of time and quality).

The calibration and held-out text are those of ``examples/causal_lm_pruning.py`` and ``benchmarks/llm.py``
(32 training and 32 test reviews of 128 tokens). Every row starts from the dense model; its wall time and
peak memory (resident set sampled every 2 ms, above what the process held before the pass, as a multiple
of the float32 model) cover the whole ``prune_weights`` call.

Run: ``.venv/bin/python benchmarks/llm_blockwise.py`` (``--quick`` for a smoke run). Writes
``results/llm_blockwise.{json,png}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import compute_weight_importance, compute_weight_masks, prune_weights
from hf_gradprune.core.adapters import weight_input_dims
from hf_gradprune.core.masks import remove_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, results_header, smollm2_perplexity_setup, write_results

NAME = "llm_blockwise"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/weights/blockwise.py",
    "src/hf_gradprune/weights/reconstruction.py",
    "src/hf_gradprune/structured/rounds.py",
    "src/hf_gradprune/weights/pruning.py",
    "src/hf_gradprune/weights/criteria.py",
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
)
#: label -> (sparsity, scope, pattern)
PATTERNS = {
    "50% per row": (0.5, "per_row", "unstructured"),
    "2:4": (None, "per_tensor", "2:4"),
    "60% per row": (0.6, "per_row", "unstructured"),
    "70% per row": (0.7, "per_row", "unstructured"),
}
HALF = ("50% per row", "2:4")
HIGH = ("60% per row", "70% per row")
#: (criterion, reconstruction, allocation) and the patterns it runs at.
RUNS = (
    (("wanda", "none", "uniform"), (*HALF, *HIGH)),
    (("sparsegpt", "none", "uniform"), (*HALF, *HIGH)),
    (("wanda", "least_squares", "uniform"), HALF),
    (("wanda", "least_squares_adam", "uniform"), (*HALF, *HIGH)),
    (("gblm", "least_squares_adam", "uniform"), HALF),
    (("wanda", "none", "owl"), HIGH),
    (("wanda", "least_squares_adam", "owl"), HIGH),
)


def name_of(criterion: str, reconstruction: str, allocation: str) -> str:
    parts = [criterion, *([reconstruction] if reconstruction != "none" else [])]
    return " + ".join(parts + (["OWL"] if allocation == "owl" else []))


def main() -> None:
    started = time.perf_counter()
    args, run = smollm2_perplexity_setup(__doc__)
    example, model, model_bytes = run.example, run.model, run.model_bytes
    calibration, held_out = run.calibration, run.held_out
    dense = example.perplexity(model, held_out)
    rows = [{"method": "dense", **dict.fromkeys(PATTERNS, dense)}]
    dims = weight_input_dims(model)
    for label, (sparsity, scope, pattern) in PATTERNS.items():
        with PeakMemory() as memory:
            start = time.perf_counter()
            scores = compute_weight_importance(model, calibration, method="wanda", show_progress=False)
            masks = compute_weight_masks(scores, sparsity, scope=scope, pattern=pattern, input_dims=dims)
            seconds = time.perf_counter() - start
        del scores
        rows.append(
            {
                "method": "wanda, one shot",
                "pattern": label,
                "seconds": seconds,
                "extra_memory": (memory.peak - memory.start) / model_bytes,
                label: example.with_masks(model, masks, lambda m: example.perplexity(m, held_out)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for (criterion, reconstruction, allocation), labels in RUNS:
        for label in labels:
            sparsity, scope, pattern = PATTERNS[label]
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            with PeakMemory() as memory:
                start = time.perf_counter()
                prune_weights(
                    model,
                    calibration,
                    sparsity,
                    method=criterion,
                    scope=scope,
                    pattern=pattern,
                    sequential=True,
                    reconstruction=reconstruction,
                    allocation=allocation,
                    show_progress=False,
                )
                seconds = time.perf_counter() - start
            rows.append(
                {
                    "method": f"{name_of(criterion, reconstruction, allocation)}, layer by layer",
                    "pattern": label,
                    "seconds": seconds,
                    "extra_memory": (memory.peak - memory.start) / model_bytes,
                    label: example.perplexity(model, held_out),
                }
            )
            remove_masks(model)
            model.load_state_dict(saved)
            print(json.dumps(rows[-1]), flush=True)
    results = {
        **results_header(NAME, args),
        "model_bytes": model_bytes,
        "rows": rows,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print("\n| method | " + " | ".join(PATTERNS) + " |")
    print("|---|" + "---:|" * len(PATTERNS))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        cells = []
        for label in PATTERNS:
            row = next((r for r in mine if label in r), None)
            cost = f" ({row['seconds']:.0f} s)" if row and "seconds" in row else ""
            cells.append(f"{row[label]:.1f}{cost}" if row else "–")
        print(f"| {method} | " + " | ".join(cells) + " |")


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    labels = list(PATTERNS)
    for index, label in enumerate(labels):
        axes = figure.add_subplot(1, len(labels), index + 1)
        rows = [r for r in results["rows"] if label in r]
        axes.barh(range(len(rows)), [r[label] for r in rows], color="tab:blue")
        axes.set_yticks(
            range(len(rows)), [r["method"].replace(", layer by layer", "") for r in rows], fontsize=6
        )
        axes.set_xscale("log")
        axes.invert_yaxis()
        axes.set_title(label, fontsize=9)
        axes.set_xlabel("held-out perplexity (log)", fontsize=7)
    figure.suptitle("SmolLM2-135M pruned without retraining: block by block, with and without reconstruction")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
