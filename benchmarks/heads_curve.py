"""Accuracy against the fraction of heads removed, by importance order, reverse order and random order.

On the peers' protocol (``common.py``): the fine-tuned dense MiniLM, 512 training reviews in batches of 32
for importance, 2,000 test reviews. For each fraction f of heads (0-90%), ``round(12 f)`` heads leave
every layer, chosen by each head criterion of ``compute_head_importance`` (``fisher`` = Σ g², the default;
``sum_of_abs`` = Σ |g|; ``abs_of_sum`` = |Σ g|, the first seed's formula), by the reverse of the default
order (most important first: the worst case), or at random (several seeds). Accuracy is measured right
after the cut and, for the default order, its reverse and the first random seed, after a short fine-tune
(``--finetune_steps`` at the peers' learning rate).

Run: ``.venv/bin/python benchmarks/heads_curve.py`` (``--quick`` for a smoke run). Writes
``results/heads_curve.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import compute_head_importance, prune_heads, select_heads_to_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    RESULTS,
    accuracy,
    dense_minilm,
    encode,
    peer_split,
    peer_training_args,
    results_header,
    train_rows,
    write_results,
)

NAME = "heads_curve"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/structured/gates.py",
    "src/hf_gradprune/structured/selection.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
)
CRITERIA = ("fisher", "sum_of_abs", "abs_of_sum")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration_reviews", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32, help="Reviews per importance batch.")
    parser.add_argument("--test_reviews", type=int, default=2000)
    parser.add_argument("--random_seeds", type=int, default=3)
    parser.add_argument("--finetune_steps", type=int, default=50, help="Steps of the short fine-tune.")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2 fractions, 200 test reviews.")
    args = parser.parse_args()
    if args.quick:
        args.fractions, args.test_reviews, args.random_seeds, args.finetune_steps = [0.5, 0.9], 200, 1, 4
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    train, test = peer_split(n_test=args.test_reviews)
    calibration = encode(train[: args.calibration_reviews], args.batch_size)
    test_batches = encode(test, 128)
    dense = dense_minilm()
    num_layers, num_heads = 6, 12
    scores = {
        c: compute_head_importance(dense, calibration, accumulate=c, show_progress=False) for c in CRITERIA
    }
    orders = {c: scores[c] for c in CRITERIA}
    orders["reverse"] = -scores["fisher"]
    for seed in range(args.random_seeds):
        orders[f"random_{seed}"] = torch.rand(
            num_layers, num_heads, generator=torch.Generator().manual_seed(seed)
        )
    finetuned_orders = ["fisher", "reverse", "random_0"]
    dense_accuracy = accuracy(dense, test_batches)
    print(f"dense: {dense_accuracy:.4f} on {len(test)} test reviews", flush=True)
    rows = []
    for fraction in args.fractions:
        per_layer = round(num_heads * fraction)
        for name, order in orders.items():
            model = copy.deepcopy(dense)
            prune_heads(model, select_heads_to_prune(order, per_layer=per_layer))
            row = {"fraction": fraction, "heads_per_layer": per_layer, "order": name}
            row["accuracy"] = accuracy(model, test_batches)
            if name in finetuned_orders and args.finetune_steps:
                training = peer_training_args(CACHE / "scratch", max_steps=args.finetune_steps)
                train_rows(model, train, args=training)
                row["accuracy_finetuned"] = accuracy(model, test_batches)
            rows.append(row)
            print(json.dumps(row), flush=True)
    results = {
        **results_header(NAME, args),
        "dense_accuracy": dense_accuracy,
        "test_reviews": len(test),
        "rows": rows,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print_table(results)


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    names = list(dict.fromkeys(row["order"] for row in results["rows"]))
    colors = {name: f"C{index}" for index, name in enumerate(names)}  # one colour per order in both panels
    for index, (key, title) in enumerate(
        (("accuracy", "right after the cut"), ("accuracy_finetuned", "after a short fine-tune"))
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        names = dict.fromkeys(row["order"] for row in results["rows"] if key in row)
        for name in names:
            points = [
                (row["fraction"], row[key]) for row in results["rows"] if row["order"] == name and key in row
            ]
            style = ":" if name.startswith("random") else "-"
            axes.plot(*zip(*points, strict=True), style, marker="o", label=name, color=colors[name])
        axes.axhline(results["dense_accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
        axes.set_title(f"MiniLM heads removed: {title}")
        axes.set_xlabel("fraction of heads removed (every layer)")
        axes.set_ylabel(f"accuracy ({results['test_reviews']} test reviews)")
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def print_table(results: dict) -> None:
    names = list(dict.fromkeys(row["order"] for row in results["rows"]))
    print("\n| heads removed | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for fraction in dict.fromkeys(row["fraction"] for row in results["rows"]):
        cells = []
        for name in names:
            row = next(r for r in results["rows"] if r["fraction"] == fraction and r["order"] == name)
            tuned = f" ({row['accuracy_finetuned']:.3f})" if "accuracy_finetuned" in row else ""
            cells.append(f"{row['accuracy']:.3f}{tuned}")
        print(f"| {fraction:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
