"""Depth against width: about a quarter of the layers removed by importance, beside heads and neurons
removed to the same block FLOPs, right after the cut, after a short fine-tune, and in real speed.

MiniLM on the peers' protocol (``common.py``): the fine-tuned dense model; 2 of its 6 layers removed by the
Fisher information of a gate on each block's residual branch (``--prune_layers``' default) and by ShortGPT's
block influence; heads and FFN neurons chosen together to the same block FLOPs (``prune_to_flops``, 8
rounds), with and without mask tuning, and layers ranked with them inside the same budget
(``prune_to_flops(..., layers=True)``, ``--prune_flops_structures heads,ffn,layers``). Accuracy right after on
2,000 test reviews, then after one epoch of the peers' fine-tune for the dense model, the Fisher depth cut,
the width cut and the joint cut.

SmolLM2-135M (GGUF, float32): 8 of its 30 layers removed the same two ways, beside key/value groups and FFN
neurons to the same block FLOPs (4 rounds), with and without mask tuning, and the joint budget; perplexity on
held-out reviews disjoint from the calibration text, right after and after ``--smollm2_steps`` steps of
causal-LM fine-tuning on training reviews (AdamW, lr 1e-4) for the dense model and the four untuned cuts.

Speed: every variant timed interleaved in one process with ``--threads`` torch threads (MiniLM: throughput
at 32 x 128 tokens, latency at 1 x 128; SmolLM2: forward at 4 x 128 and greedy ``generate``).

Run: ``.venv/bin/python benchmarks/depth.py`` (``--quick`` for a smoke run). Writes
``results/depth.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import Trainer

from hf_gradprune import flops_ratio, prune_layers_by_importance, prune_to_flops
from hf_gradprune.testing import load_rotten_tomatoes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    RESULTS,
    accuracy,
    dense_minilm,
    encode,
    load_causal_lm_example,
    peer_split,
    peer_training_args,
    results_header,
    tokenizer,
    train_rows,
    write_results,
)
from structured_speed import timed

NAME = "depth"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/training/planning.py",
    "src/hf_gradprune/structured/flops.py",
    "src/hf_gradprune/structured/selection.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
    "src/hf_gradprune/core/adapters",
)
SEQ_LEN = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing.")
    parser.add_argument("--repeats", type=int, default=15, help="Interleaved timing rounds.")
    parser.add_argument("--test_reviews", type=int, default=2000)
    parser.add_argument("--calibration_reviews", type=int, default=512)
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--smollm2_calibration", type=int, default=8, help="Batches of 4 x 128 tokens.")
    parser.add_argument("--smollm2_eval_batches", type=int, default=16, help="Held-out batches of 4 x 128.")
    parser.add_argument("--smollm2_steps", type=int, default=64, help="Fine-tuning steps of 4 x 128.")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.test_reviews, args.finetune = 3, 200, False
        args.smollm2_calibration, args.smollm2_eval_batches, args.new_tokens = 1, 1, 4
    return args


def cuts(dense: torch.nn.Module, calibration: list[dict], layers: int, rounds: int) -> dict[str, Any]:
    """The dense model, ``layers`` layers removed by each layer importance, and heads and neurons removed to
    the same block FLOPs, untuned and tuned: name to ``(model, seconds)``."""
    variants: dict[str, Any] = {"dense": (dense, 0.0)}
    for method in ("fisher", "block_influence"):
        model, start = copy.deepcopy(dense), time.perf_counter()
        prune_layers_by_importance(model, calibration, layers, method, show_progress=False)
        variants[f"{layers} layers, {method}"] = (model, time.perf_counter() - start)
    ratio = flops_ratio(variants[f"{layers} layers, fisher"][0], SEQ_LEN)
    for name, options in (
        (f"width to {ratio:.0%} FLOPs", {}),
        (f"width to {ratio:.0%} FLOPs, tuned", {"mask_tuning": True}),
        (f"depth + width to {ratio:.0%} FLOPs", {"layers": True}),
    ):
        model, start = copy.deepcopy(dense), time.perf_counter()
        report = prune_to_flops(
            model, calibration, ratio, seq_len=SEQ_LEN, rounds=rounds, show_progress=False, **options
        )
        if options.get("layers"):
            print(name, "removed layers", report["layers"], flush=True)
        variants[name] = (model, time.perf_counter() - start)
    return variants


def measured(variants: dict[str, Any], metric: str, measure) -> list[dict[str, Any]]:
    """A row per variant: its pruning time, block FLOPs, parameters and ``metric`` (``measure(model)``)."""
    rows = []
    for name, (model, seconds) in variants.items():
        rows.append(
            {
                "name": name,
                "prune_seconds": round(seconds, 1),
                "flops_ratio": flops_ratio(model, SEQ_LEN),
                "parameters": sum(p.numel() for p in model.parameters()),
                metric: measure(model),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    train, test = peer_split(n_test=args.test_reviews)
    calibration = encode(train[: args.calibration_reviews], 32)
    tests = encode(test, 128)
    variants = cuts(dense_minilm(), calibration, 2, 8)
    rows = measured(variants, "accuracy", lambda model: accuracy(model, tests))
    texts = [text for text, _ in test[: 32 * 12]]
    joined = [" ".join(texts[r * 12 : (r + 1) * 12]) for r in range(32)]
    batch32 = dict(
        tokenizer()(joined, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    )
    models = {name: model for name, (model, _) in variants.items()}
    with torch.inference_mode():
        throughput = timed(models, batch32, args)
        latency = timed(models, {k: v[:1] for k, v in batch32.items()}, args)
    for row in rows:
        row["throughput_b32"] = throughput[row["name"]]["forward"]
        row["latency_b1"] = latency[row["name"]]["forward"]
    if args.finetune:
        for row in rows[:2] + [r for r in rows if "width" in r["name"] and "tuned" not in r["name"]]:
            model = copy.deepcopy(models[row["name"]]).train()
            train_rows(model, train, args=peer_training_args(CACHE / "scratch"))
            row["accuracy_finetuned"] = accuracy(model, tests)
            print(row["name"], "fine-tuned", row["accuracy_finetuned"], flush=True)
    return {"test_reviews": len(test), "variants": rows}


def finetune_causal(model: torch.nn.Module, batches: list[dict], steps: int) -> None:
    """``steps`` Trainer steps of causal-LM loss on ``batches`` (4 x 128 tokens each, cycled)."""
    rows = torch.cat([b["input_ids"] for b in batches])
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = peer_training_args(
        CACHE / "scratch",
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        warmup_steps=0,
        num_train_epochs=1,
    )
    Trainer(model=model.train(), args=args, train_dataset=data).train()
    model.eval()


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    example = load_causal_lm_example()
    torch.manual_seed(0)
    dense, tok = example.load_smollm2()
    reviews = load_rotten_tomatoes()["train"]["text"]
    calibration = example.text_batches(tok, reviews, args.smollm2_calibration, 4, SEQ_LEN)
    held_out = example.text_batches(
        tok, load_rotten_tomatoes()["test"]["text"], args.smollm2_eval_batches, 4, SEQ_LEN
    )
    tuning_data = example.text_batches(tok, reviews, args.smollm2_calibration + 16, 4, SEQ_LEN)
    tuning_data = tuning_data[args.smollm2_calibration :]  # fine-tuning text disjoint from the calibration
    variants = cuts(dense, calibration, 8, 4)
    rows = measured(variants, "perplexity", lambda model: example.perplexity(model, held_out))
    models = {name: model for name, (model, _) in variants.items()}
    batch = {"input_ids": held_out[0]["input_ids"], "use_cache": False}
    prompt = {"input_ids": held_out[0]["input_ids"][:1, :32]}
    with torch.inference_mode():
        timings = timed(models, batch, args, generate=prompt)
    for row in rows:
        row.update(timings[row["name"]])
    if args.finetune:
        for row in [r for r in rows if "tuned" not in r["name"]]:
            model = copy.deepcopy(models[row["name"]])
            finetune_causal(model, tuning_data, args.smollm2_steps)
            row["perplexity_finetuned"] = example.perplexity(model, held_out)
            print(row["name"], "fine-tuned", row["perplexity_finetuned"], flush=True)
    return {"variants": rows}


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (key, metric, label) in enumerate(
        (("minilm", "accuracy", "accuracy (test reviews)"), ("smollm2", "perplexity", "held-out perplexity"))
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        rows = results[key]["variants"]
        positions = range(len(rows))
        axes.bar(positions, [r[metric] for r in rows], color="tab:orange", label="right after the cut")
        tuned = [(i, r[f"{metric}_finetuned"]) for i, r in enumerate(rows) if f"{metric}_finetuned" in r]
        if tuned:
            axes.scatter(*zip(*tuned, strict=True), color="black", zorder=3, label="after the fine-tune")
        if metric == "perplexity":
            axes.set_yscale("log")
        names = [
            f"{r['name']}\n{r['throughput_b32' if key == 'minilm' else 'forward']['speedup']:.2f}x"
            for r in rows
        ]
        axes.set_xticks(list(positions), names, fontsize=6)
        axes.set_ylabel(label)
        axes.set_title(f"{key}: depth against width (speed-up under each name)")
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {**results_header(NAME, args), "minilm": minilm(args), "smollm2": smollm2(args)}
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    write_results(results, args, plot)
    print("\n| MiniLM | block FLOPs | accuracy right after | after 1 epoch | throughput b32 | latency b1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results["minilm"]["variants"]:
        tuned = f"{r['accuracy_finetuned']:.3f}" if "accuracy_finetuned" in r else "–"
        print(
            f"| {r['name']} | {r['flops_ratio']:.0%} | {r['accuracy']:.3f} | {tuned} | "
            f"{r['throughput_b32']['speedup']:.2f}x | {r['latency_b1']['speedup']:.2f}x |"
        )
    print("\n| SmolLM2 | block FLOPs | perplexity right after | after fine-tune | forward | generate |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results["smollm2"]["variants"]:
        tuned = f"{r['perplexity_finetuned']:.1f}" if "perplexity_finetuned" in r else "–"
        print(
            f"| {r['name']} | {r['flops_ratio']:.0%} | {r['perplexity']:.1f} | {tuned} | "
            f"{r['forward']['speedup']:.2f}x | {r['generate']['speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
