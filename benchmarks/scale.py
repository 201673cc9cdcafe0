"""Memory of the whole one-shot weight-pruning path on SmolLM2-135M (float32), stage by stage, and of the
layer-by-layer passes.

The stages a user runs to prune an LLM without training: load the model, score every weight (``obd``, w² ·
Σg², the strongest criterion of ``benchmarks/llm.py``, on ``--calibration_batches`` batches of 4 x 128
tokens), turn the scores into 50% per-row masks, apply them (bool buffers and gradient hooks), save with
``save_pruned`` and load again with ``load_pruned`` (in a fresh process); then the passes of
``FRESH_PASSES`` (``prune_weights`` at 50% per row, one shot or block by block), each in a fresh process that
loads the dense model from a safetensors copy, as a user loads a checkpoint (the GGUF loader leaves more
than the model resident: the ``load`` stage).
Peak resident memory is sampled every 2 ms during each stage and reported as a multiple of the float32
model's size, in total (the model included: the targets are 2.5x one shot, 1.3x block by block) and above
what the process held before the stage. The run ends with the masks exact: the saved and reloaded weights
have exactly half of every row at zero.

Run: ``.venv/bin/python benchmarks/scale.py`` (``--quick`` for a smoke run), and with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment for what the pass needs rather than what glibc keeps.
Writes ``results/scale.{json,png}`` (``results/scale_mmap_threshold.*``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import compute_weight_importance, compute_weight_masks, load_pruned, save_pruned
from hf_gradprune.core.adapters import weight_input_dims
from hf_gradprune.core.masks import apply_masks, compute_sparsity, get_masks
from hf_gradprune.testing import load_rotten_tomatoes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    PeakMemory,
    load_causal_lm_example,
    resident_bytes,
    results_header,
    write_results,
)

# glibc keeps freed heap memory and raises its mmap threshold as large blocks are freed, so the resident set
# overstates what a pass needs; MALLOC_MMAP_THRESHOLD_=65536 fixes the threshold (the run is named after it).
NAME = "scale" + ("_mmap_threshold" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "")
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/structured/rounds.py",
    "src/hf_gradprune/weights/pruning.py",
    "src/hf_gradprune/weights/blockwise.py",
    "src/hf_gradprune/weights/criteria.py",
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/io/checkpoint.py",
    "src/hf_gradprune/io/folders.py",
    "src/hf_gradprune/io/saving.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
)
#: The passes measured each in a fresh process that loads the model from safetensors: (criterion,
#: reconstruction, block by block, scoring passes), the rows of ``benchmarks/llm_blockwise.py``, and ``obd``
#: one shot in one pass and in bounded memory (8 passes, checkpointed) and block by block.
FRESH_PASSES = (
    ("wanda", "none", False, 1),
    ("wanda", "none", True, 1),
    ("sparsegpt", "none", True, 1),
    ("wanda", "least_squares", True, 1),
    ("wanda", "least_squares_adam", True, 1),
    ("gblm", "least_squares_adam", True, 1),
    ("obd", "none", False, 1),
    ("obd", "none", False, 8),
    ("obd", "none", True, 1),
)


FRESH_LOAD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from common import PeakMemory, resident_bytes
from hf_gradprune import load_pruned
baseline = resident_bytes()
with PeakMemory() as memory:
    load_pruned(sys.argv[1])
print(json.dumps({"baseline": baseline, "peak": memory.peak}))
"""


SAVE_DENSE = """
import sys
sys.path.insert(0, sys.argv[1])
from common import load_causal_lm_example
model, tokenizer = load_causal_lm_example().load_smollm2()
model.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
"""


FRESH_PASS = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from common import PeakMemory, load_causal_lm_example, resident_bytes
from hf_gradprune import prune_weights
from hf_gradprune.testing import load_rotten_tomatoes
folder, method, reconstruction, sequential = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
passes = int(sys.argv[7])
tokenizer = AutoTokenizer.from_pretrained(folder)
texts = load_rotten_tomatoes()["train"]["text"]
batches = load_causal_lm_example().text_batches(tokenizer, texts, int(sys.argv[6]), 4, 128)
baseline = resident_bytes()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
start = time.perf_counter()
with PeakMemory() as memory:
    prune_weights(model, batches, 0.5, method=method, scope="per_row", sequential=sequential,
                  reconstruction=reconstruction, scoring_passes=passes, show_progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"baseline": baseline, "start": memory.start, "peak": memory.peak, "seconds": seconds}))
"""


def fresh_pass(folder: str, run: tuple[str, str, bool, int], batches: int, model_bytes: int) -> dict:
    """``prune_weights`` at 50% per row in a fresh process that loads the dense model from ``folder``
    (safetensors, memory-mapped as ``from_pretrained`` maps it): its peak with the model, and above what the
    process held when the pass began."""
    method, reconstruction, sequential, passes = run
    args = [str(Path(__file__).resolve().parent), folder, method, reconstruction, str(int(sequential))]
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PASS, *args, str(batches), str(passes)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    memory = json.loads(out.splitlines()[-1])
    suffix = "" if reconstruction == "none" else f" + {reconstruction}"
    suffix += "" if passes == 1 else f", {passes} passes"
    return {
        "stage": f"{'block by block' if sequential else 'one shot'}, {method}{suffix} (fresh process)",
        "method": method,
        "reconstruction": reconstruction,
        "sequential": sequential,
        "scoring_passes": passes,
        "seconds": round(memory["seconds"], 2),
        "peak_total": (memory["peak"] - memory["baseline"]) / model_bytes,
        "peak_extra": (memory["peak"] - memory["start"]) / model_bytes,
    }


def fresh_passes(
    runs: Sequence[tuple[str, str, bool, int]], args: argparse.Namespace, model_bytes: int
) -> list:
    """:func:`fresh_pass` for each of ``runs``, from one safetensors copy of the dense model; each row printed
    as it comes."""
    rows = []
    with tempfile.TemporaryDirectory() as dense:
        here = str(Path(__file__).resolve().parent)
        subprocess.run([sys.executable, "-c", SAVE_DENSE, here, dense], capture_output=True, check=True)
        for run in runs:
            rows.append(fresh_pass(dense, run, args.calibration_batches, model_bytes))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fresh_load(folder: str, model_bytes: int) -> dict:
    """``load_pruned`` in a fresh process: its peak above the process's imports."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, folder, str(Path(__file__).resolve().parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    memory = json.loads(out.splitlines()[-1])
    peak = (memory["peak"] - memory["baseline"]) / model_bytes
    return {
        "stage": "load_pruned (fresh process)",
        "seconds": round(time.perf_counter() - start, 2),
        "peak_total": peak,
        "peak_extra": peak - 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--fresh_only",
        nargs="+",
        metavar="METHOD",
        help="Run only the fresh-process passes of these methods, their rows replaced in the results.",
    )
    args = parser.parse_args()
    if args.quick:
        args.calibration_batches = 1
    if args.fresh_only:
        fresh_only(args)
        return
    example = load_causal_lm_example()
    started = time.perf_counter()
    baseline = resident_bytes()
    model, tokenizer = example.load_smollm2()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stages: list[dict] = [{"stage": "load", "resident": (resident_bytes() - baseline) / model_bytes}]

    @contextlib.contextmanager
    def stage(name: str):
        with PeakMemory() as memory:
            start = time.perf_counter()
            yield
            seconds = time.perf_counter() - start
        peaks = {"total": memory.peak - baseline, "extra": memory.peak - memory.start}
        stages.append({"stage": name, "seconds": round(seconds, 2)})
        stages[-1].update({f"peak_{k}": v / model_bytes for k, v in peaks.items()})
        print(json.dumps(stages[-1]), flush=True)

    reviews = load_rotten_tomatoes()
    batches = example.text_batches(tokenizer, reviews["train"]["text"], args.calibration_batches, 4, 128)
    dims = weight_input_dims(model)
    with stage("importance, obd"):
        scores = compute_weight_importance(model, batches, "obd", show_progress=False)
    with stage("masks, 50% per row"):
        masks = compute_weight_masks(scores, 0.5, "per_row", input_dims=dims)
        del scores
    with stage("apply masks"):
        apply_masks(model, masks)
        del masks
    with tempfile.TemporaryDirectory() as folder:
        with stage("save_pruned"):
            save_pruned(model, folder)
        stages.append(fresh_load(folder, model_bytes))
        print(json.dumps(stages[-1]), flush=True)
        again = load_pruned(folder)
    stages += fresh_passes(FRESH_PASSES[:1] if args.quick else FRESH_PASSES, args, model_bytes)
    sparsity = compute_sparsity(again)
    rows_exact = all(
        bool((mask.sum(dim=1) == mask.shape[1] // 2).all()) for mask in get_masks(again).values()
    )
    results = {
        **results_header(NAME, args),
        "model_bytes": model_bytes,
        "parameters": sum(p.numel() for p in again.parameters()),
        "stages": stages,
        "peak_total": max(s.get("peak_total", 0.0) for s in stages),
        "sparsity_after_reload": sparsity["overall"],
        "every_row_exactly_half": rows_exact,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print("\n| stage | seconds | peak memory, total (x fp32 model) | above the stage's start |")
    print("|---|---:|---:|---:|")
    for s in stages[1:]:
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_total']:.2f} | {s['peak_extra']:.2f} |")
    print(f"\nmodel {model_bytes / 2**20:.0f} MiB; every row exactly half zero after reload: {rows_exact}")


def fresh_only(args: argparse.Namespace) -> None:
    """The passes of ``FRESH_PASSES`` whose method is in ``args.fresh_only``, into the existing results."""
    previous = args.output_dir / f"{NAME}.json"
    if not previous.is_file():
        raise SystemExit(f"--fresh_only updates {previous}: run the whole benchmark first.")
    results = json.loads(previous.read_text())
    model_bytes = results["model_bytes"]
    started = time.perf_counter()
    header = results_header(NAME, args)
    runs = [run for run in FRESH_PASSES if run[0] in args.fresh_only]
    for row in fresh_passes(runs, args, model_bytes):
        names = [stage["stage"] for stage in results["stages"]]
        if row["stage"] in names:
            results["stages"][names.index(row["stage"])] = row
        else:
            results["stages"].append(row)
    results["peak_total"] = max(s.get("peak_total", 0.0) for s in results["stages"])
    key = "_".join(args.fresh_only)
    results[f"date_fresh_only_{key}"] = header["date"]
    results[f"machine_fresh_only_{key}"] = header["machine"]
    results[f"runtime_s_fresh_only_{key}"] = round(time.perf_counter() - started, 1)
    write_results(results, args, plot)


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    stages = [s for s in results["stages"] if "peak_total" in s]
    names = [
        s["stage"].replace(" (fresh process)", "*").replace("block by block, ", "blockwise ") for s in stages
    ]
    axes.bar(names, [s["peak_total"] for s in stages], color="tab:blue")
    axes.axhline(2.5, color="black", linestyle="--", linewidth=1, label="target 2.5x, one shot")
    axes.axhline(1.3, color="tab:red", linestyle="--", linewidth=1, label="target 1.3x, block by block")
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="the model")
    axes.set_ylabel("peak resident memory (x fp32 model)")
    size = results["model_bytes"] / 2**20
    axes.set_title(f"SmolLM2-135M weight pruning, one shot and block by block ({size:.0f} MiB fp32)")
    axes.tick_params(axis="x", labelsize=7, rotation=30)
    for label in axes.get_xticklabels():
        label.set_horizontalalignment("right")
    axes.set_xlabel("* in a fresh process (the passes: loaded from safetensors)", fontsize=7)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
