"""Structured pruning to a FLOPs budget: accuracy without retraining, after a fine-tune, and real speed.

MiniLM on the peers' protocol (``common.py``; TextPruner and Torch-Pruning were measured on the same split,
calibration and timing): the fine-tuned dense model; half of the heads (6 of 12 in every layer, Fisher of
the head gates) at once (with and without mask tuning) or in 6 rounds; the peers' uniform shape (6 heads and
768 neurons in every layer) by the same importance in 8 rounds; and heads and FFN neurons chosen together by
Fisher importance per FLOP until the block FLOPs at sequence 128 are half, in 1, 8 (the default) or 16
rounds, with and without mask tuning (by distillation, the default, and by least squares), neurons leaving
in blocks of 64 (the default) or, once, one by one. Accuracy right after pruning on 2,000 test reviews (and
on the peers' 1,000), then after one epoch of the peers' fine-tune for the dense model, the default cut and
the tuned single cut. Speed: throughput at batch 32 x 128 tokens and latency at batch 1 x 128, every
variant timed interleaved in one process with ``--threads`` torch threads (the peers used 1).

SmolLM2-135M (GGUF, float32) at 75% and 50% of the block FLOPs (key/value groups and FFN neurons, Fisher
on label-free review text, ``--smollm2_rounds`` rounds, with and without mask tuning): forward (batch
8 x 128) and greedy ``generate`` (batch 1) speed-ups, and perplexity on held-out reviews disjoint from the
calibration text.

Run: ``.venv/bin/python benchmarks/structured_speed.py`` (``--quick`` for a smoke run; ``--skip_smollm2``).
Writes ``results/structured_speed.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from hf_gradprune import (
    flops_ratio,
    prune_in_rounds,
    prune_to_flops,
    select_heads_to_prune,
    select_units_to_prune,
)
from hf_gradprune.testing import load_rotten_tomatoes, smollm2_gguf

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
    speed,
    time_interleaved,
    tokenizer,
    train_rows,
    write_results,
)

NAME = "structured_speed"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/training/planning.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/structured/selection.py",
    "src/hf_gradprune/structured/flops.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
)
SEQ_LEN = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (peers: 1).")
    parser.add_argument("--repeats", type=int, default=15, help="Interleaved timing rounds.")
    parser.add_argument("--test_reviews", type=int, default=2000)
    parser.add_argument("--calibration_reviews", type=int, default=512)
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip_smollm2", action="store_true")
    parser.add_argument("--smollm2_calibration", type=int, default=8, help="Batches of 8 x 128 tokens.")
    parser.add_argument("--smollm2_rounds", type=int, default=4, help="Scoring rounds of each cut.")
    parser.add_argument("--smollm2_eval_batches", type=int, default=16, help="Held-out batches of 8 x 128.")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.test_reviews, args.finetune = 3, 200, False
        args.smollm2_calibration, args.smollm2_eval_batches, args.new_tokens = 2, 2, 4
    return args


def timed(
    variants: dict[str, torch.nn.Module], batch: dict, args: argparse.Namespace, generate: dict | None = None
):
    """Interleaved forward (and generate) timings; speed-ups against the first variant."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:

        def forward(model):
            return lambda: model(**batch)

        times = time_interleaved({name: forward(m) for name, m in variants.items()}, args.repeats, 2)
        dense = next(iter(times.values()))
        result = {name: {"forward": speed(t, dense)} for name, t in times.items()}
        if generate is not None:

            def gen(model):
                return lambda: model.generate(
                    **generate,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    min_new_tokens=args.new_tokens,
                )

            times = time_interleaved(
                {name: gen(m) for name, m in variants.items()}, max(3, args.repeats // 3), 1
            )
            dense = next(iter(times.values()))
            for name, t in times.items():
                result[name]["generate"] = speed(t, dense)
        return result
    finally:
        torch.set_num_threads(threads)


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    train, test = peer_split(n_test=args.test_reviews)
    _, peers_test = peer_split(n_test=1000)
    calibration = encode(train[: args.calibration_reviews], 32)
    tests = {"test": encode(test, 128), "peers_test": encode(peers_test, 128)}
    dense = dense_minilm()
    variants: dict[str, torch.nn.Module] = {"dense": dense}
    reports: dict[str, dict] = {}

    def per_layer(heads: int, neurons: int, rounds: int):
        """A chooser removing ``heads`` and ``neurons`` from every layer over ``rounds`` rounds."""

        def choose(importance, index):
            share = [round(n * (index + 1) / rounds) - round(n * index / rounds) for n in (heads, neurons)]
            units = {"heads": select_heads_to_prune(importance["heads"], per_layer=share[0])}
            if "ffn" in importance:
                units["ffn"] = select_units_to_prune(importance["ffn"], per_layer=share[1])
            return units

        return choose

    shapes = {
        "heads 50%, one-shot": (("heads",), per_layer(6, 0, 1), 1, False),
        "heads 50%, one-shot, tuned": (("heads",), per_layer(6, 0, 1), 1, True),
        "heads 50%, 6 rounds": (("heads",), per_layer(6, 0, 6), 6, False),
        "6 heads + 768 neurons per layer, 8 rounds": (("heads", "ffn"), per_layer(6, 768, 8), 8, False),
    }
    for name, (structures, choose, rounds, tuning) in shapes.items():
        model = copy.deepcopy(dense)
        prune_in_rounds(
            model, calibration, structures, choose, rounds=rounds, mask_tuning=tuning, show_progress=False
        )
        variants[name] = model
    for rounds, tuning, multiple in (
        (1, None, None),
        (1, "distillation", None),
        (1, "least_squares", None),
        (8, None, None),
        (8, "distillation", None),
        (8, "least_squares", None),
        (16, None, None),
        (8, None, 1),
    ):
        model = copy.deepcopy(dense)
        report = prune_to_flops(
            model,
            calibration,
            0.5,
            seq_len=SEQ_LEN,
            rounds=rounds,
            mask_tuning=tuning is not None,
            mask_tuning_method=tuning or "distillation",
            ffn_multiple_of=multiple,
            show_progress=False,
        )
        name = f"FLOPs 50%, {rounds} round{'s' if rounds > 1 else ''}"
        name += {None: "", "distillation": ", tuned", "least_squares": ", tuned by least squares"}[tuning]
        name += ", neurons one by one" if multiple == 1 else ""
        reports[name] = {k: v for k, v in report.items() if k.startswith("prune/")}
        reports[name]["units"] = {
            s: {str(layer): len(u) for layer, u in layers.items()} for s, layers in report["units"].items()
        }
        variants[name] = model

    rows = []
    for name, model in variants.items():
        row = {
            "name": name,
            "flops_ratio": flops_ratio(model, SEQ_LEN),
            "parameters": sum(p.numel() for p in model.parameters()),
            **{f"accuracy_{split}": accuracy(model, batches) for split, batches in tests.items()},
            **reports.get(name, {}),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "units"}), flush=True)

    texts = [text for text, _ in test[: 32 * 12]]
    joined = [" ".join(texts[r * 12 : (r + 1) * 12]) for r in range(32)]
    batch32 = dict(
        tokenizer()(joined, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    )
    batch1 = {k: v[:1] for k, v in batch32.items()}
    with torch.inference_mode():
        throughput = timed(variants, batch32, args)
        latency = timed(variants, batch1, args)
    for row in rows:
        row["throughput_b32"] = throughput[row["name"]]["forward"]
        row["latency_b1"] = latency[row["name"]]["forward"]

    if args.finetune:
        for name in ("dense", "FLOPs 50%, 8 rounds", "FLOPs 50%, 1 round, tuned"):
            model = copy.deepcopy(variants[name]).train()
            train_rows(model, train, args=peer_training_args(CACHE / "scratch"))
            row = next(r for r in rows if r["name"] == name)
            for split, batches in tests.items():
                row[f"accuracy_{split}_finetuned"] = accuracy(model, batches)
            print(name, "fine-tuned", row["accuracy_test_finetuned"], flush=True)
    return {"dense_accuracy": rows[0]["accuracy_test"], "test_reviews": len(test), "variants": rows}


def _review_batches(tokenizer, texts: list[str], count: int, rows: int = 8) -> list[dict]:
    """``count`` batches of ``rows`` x 128 tokens of running review text (no padding)."""
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    per_batch = rows * SEQ_LEN
    if len(ids) < count * per_batch:
        raise ValueError(f"Not enough text for {count} batches: {len(ids)} tokens.")
    return [{"input_ids": ids[i * per_batch : (i + 1) * per_batch].view(rows, SEQ_LEN)} for i in range(count)]


@torch.inference_mode()
def perplexity(model, batches: list[dict]) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)
        tokens = batch["input_ids"].numel() - batch["input_ids"].shape[0]
        total += float(out.loss) * tokens
        count += tokens
    return math.exp(total / count)


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    folder, gguf = smollm2_gguf()
    dense = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    reviews = load_rotten_tomatoes()
    calibration = _review_batches(tok, reviews["train"]["text"], args.smollm2_calibration)
    held_out = _review_batches(tok, reviews["test"]["text"], args.smollm2_eval_batches)
    variants = {"dense": dense}
    rows = []
    for ratio, tuning in ((0.75, False), (0.75, True), (0.5, False), (0.5, True)):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = prune_to_flops(
            model,
            calibration,
            ratio,
            seq_len=SEQ_LEN,
            rounds=args.smollm2_rounds,
            mask_tuning=tuning,
            show_progress=False,
        )
        name = f"FLOPs {ratio:.0%}, {args.smollm2_rounds} rounds" + (", tuned" if tuning else "")
        variants[name] = model
        rows.append(
            {
                "name": name,
                "prune_seconds": time.perf_counter() - start,
                **{k: v for k, v in report.items() if k.startswith("prune/")},
            }
        )
    rows.insert(0, {"name": "dense"})
    for row in rows:
        model = variants[row["name"]]
        row["flops_ratio"] = flops_ratio(model, SEQ_LEN)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["perplexity"] = perplexity(model, held_out)
        print(json.dumps(row), flush=True)
    batch = {"input_ids": held_out[0]["input_ids"], "use_cache": False}
    prompt = {"input_ids": held_out[0]["input_ids"][:1, :32]}
    with torch.inference_mode():
        timings = timed(variants, batch, args, generate=prompt)
    for row in rows:
        row.update(timings[row["name"]])
    return {"variants": rows}


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2, 1)
    rows = results["minilm"]["variants"][1:]
    positions = range(len(rows))
    axes.bar(positions, [r["throughput_b32"]["speedup"] for r in rows], color="tab:blue", label="measured")
    axes.scatter(
        positions, [1 / r["flops_ratio"] for r in rows], color="black", marker="_", s=400, label="FLOPs-ideal"
    )
    axes.set_xticks(list(positions), [r["name"] for r in rows], fontsize=7, rotation=15)
    axes.set_ylabel("throughput speed-up (batch 32 x 128)")
    axes.set_title("MiniLM: speed-up over dense")
    axes.legend(fontsize=7)
    axes = figure.add_subplot(1, 2, 2)
    axes.bar(positions, [r["accuracy_test"] for r in rows], color="tab:orange", label="right after pruning")
    finetuned = [
        (i, r["accuracy_test_finetuned"]) for i, r in enumerate(rows) if "accuracy_test_finetuned" in r
    ]
    if finetuned:
        axes.scatter(*zip(*finetuned, strict=True), color="black", zorder=3, label="after 1 epoch")
    axes.axhline(
        results["minilm"]["dense_accuracy"], color="black", linestyle="--", linewidth=1, label="dense"
    )
    axes.set_ylim(0.6, 0.82)
    axes.set_xticks(list(positions), [r["name"] for r in rows], fontsize=7, rotation=15)
    axes.set_ylabel(f"accuracy ({results['minilm']['test_reviews']} test reviews)")
    axes.set_title("MiniLM: accuracy")
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results = {**results_header(NAME, args), "minilm": minilm(args)}
    if not args.skip_smollm2:
        results["smollm2"] = smollm2(args)
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    write_results(results, args, plot)
    print(
        "\n| MiniLM variant | FLOPs | accuracy right after (2000 / peers' 1000) | after 1 epoch "
        "| throughput b32 | latency b1 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results["minilm"]["variants"]:
        tuned = f"{r['accuracy_test_finetuned']:.3f}" if "accuracy_test_finetuned" in r else "–"
        print(
            f"| {r['name']} | {r['flops_ratio']:.0%} | {r['accuracy_test']:.3f} / "
            f"{r['accuracy_peers_test']:.3f} | {tuned} | {r['throughput_b32']['speedup']:.2f}x | "
            f"{r['latency_b1']['speedup']:.2f}x |"
        )
    if "smollm2" in results:
        print("\n| SmolLM2 variant | FLOPs | params | perplexity | forward | generate |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results["smollm2"]["variants"]:
            print(
                f"| {r['name']} | {r['flops_ratio']:.0%} | {r['parameters'] / 1e6:.1f}M | "
                f"{r['perplexity']:.1f} | {r['forward']['speedup']:.2f}x | {r['generate']['speedup']:.2f}x |"
            )


if __name__ == "__main__":
    main()
