"""What pruning costs during training: PruningTrainer with persistent masks against a plain Trainer, and the
importance passes against one plain forward and backward.

On the real MiniLM and the peers' rotten_tomatoes split (batch 32, reviews cut at 64 tokens):

- **Step time.** A plain ``Trainer`` (dense) and a ``PruningTrainer`` holding 50% masks on every attention
  and FFN matrix (gradient hooks and re-masking after each optimizer step) train in alternating chunks of
  ``--steps`` steps, ``--rounds`` times, on identical batches; a callback times every optimizer step from
  ``on_step_begin`` to ``on_step_end``, the pruning step itself and each chunk's first step left out.
- **Importance passes.** One plain forward and backward of a batch, interleaved with the per-batch cost of
  ``compute_unit_importance`` (heads and FFN neurons) and ``compute_weight_importance`` (taylor, obd and
  gblm at once) on the same batch.

Run: ``.venv/bin/python benchmarks/overhead.py`` (``--quick`` for a smoke run). Writes
``results/overhead.{json,png}``. Run it on an idle machine: the figures are ratios of medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import Trainer, TrainerCallback

from hf_gradprune import PruningArguments, PruningTrainer, compute_unit_importance, compute_weight_importance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    RESULTS,
    dense_minilm,
    encode,
    peer_split,
    peer_training_args,
    results_header,
    speed,
    time_interleaved,
    train_rows,
    write_results,
)

NAME = "overhead"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/training/trainer.py",
    "src/hf_gradprune/training/checkpoints.py",
    "src/hf_gradprune/training/callback.py",
    "src/hf_gradprune/training/reporting.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
    "src/hf_gradprune/weights/sparsity.py",
)


class StepTimer(TrainerCallback):
    """Seconds of every optimizer step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def step_times(args: argparse.Namespace) -> dict:
    train, _ = peer_split()
    rows = train[: args.steps * 32]
    dense = dense_minilm()
    timings = {"Trainer": [], "PruningTrainer, 50% masks": []}
    for _ in range(args.rounds):
        for name in timings:
            timer = StepTimer()
            training = peer_training_args(
                CACHE / "scratch", max_steps=args.steps, lr_scheduler_type="constant", warmup_steps=0
            )
            kwargs = {"args": training, "callbacks": [timer]}
            if name == "Trainer":
                train_rows(copy.deepcopy(dense).train(), rows, Trainer, **kwargs)
            else:
                pruning = PruningArguments(weight_sparsity=0.5, weight_importance="magnitude")
                train_rows(copy.deepcopy(dense).train(), rows, PruningTrainer, pruning_args=pruning, **kwargs)
            timings[name] += timer.times[2:]  # the pruning step and the first step of a chunk left out
    dense_times = timings["Trainer"]
    result = {}
    for name, times in timings.items():
        median = statistics.median(times)
        result[name] = {
            "median_ms": median * 1e3,
            "steps": len(times),
            "ratio": median / statistics.median(dense_times),
        }
    return result


def importance_cost(args: argparse.Namespace) -> dict:
    train, _ = peer_split()
    (batch,) = encode(train[:32], 32)
    model = dense_minilm()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    calls = {
        "forward + backward": forward_backward,
        "unit importance (heads + FFN)": lambda: compute_unit_importance(
            model, [batch], ("heads", "ffn"), show_progress=False
        ),
        "weight importance (taylor + obd + gblm)": lambda: compute_weight_importance(
            model, [batch], method=["taylor", "obd", "gblm"], show_progress=False
        ),
    }
    times = time_interleaved(calls, args.repeats, 2)
    reference = times["forward + backward"]
    return {
        name: {**speed(t, reference), "ratio": statistics.median(t) / statistics.median(reference)}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per chunk.")
    parser.add_argument("--rounds", type=int, default=4, help="Alternating chunks of each trainer.")
    parser.add_argument(
        "--repeats", type=int, default=15, help="Interleaved rounds of the importance timing."
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.repeats = 4, 1, 3
    started = time.perf_counter()
    results = {
        **results_header(NAME, args),
        "step_time": step_times(args),
        "importance": importance_cost(args),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print("\n| measured | median ms | / reference |\n|---|---:|---:|")
    for key in ("step_time", "importance"):
        for name, row in results[key].items():
            print(f"| {name} | {row['median_ms']:.0f} | {row['ratio']:.3f}x |")


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (key, title) in enumerate((("step_time", "training step"), ("importance", "importance pass"))):
        axes = figure.add_subplot(1, 2, index + 1)
        names = list(results[key])
        axes.bar(range(len(names)), [results[key][n]["ratio"] for n in names], color="tab:blue")
        axes.axhline(1.0, color="black", linestyle="--", linewidth=1)
        axes.set_xticks(range(len(names)), names, fontsize=7, rotation=10)
        axes.set_ylabel("time / reference (median)")
        axes.set_title(f"MiniLM, batch 32: {title}")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
