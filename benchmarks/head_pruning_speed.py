"""What structural head pruning buys at inference on the real shipped models, as ratios within one run.

MiniLM (6 layers x 12 heads): dense, 1, 3 and 6 heads removed per layer (chosen by gradient head importance
on real rotten_tomatoes reviews) and, for contrast, 50% unstructured magnitude sparsity through masks.
SmolLM2-135M (30 layers, 9 query / 3 key-value heads): dense, one key/value group (3 query heads) removed in
every layer and in the half of the layers where it matters least. For each variant: parameters, saved
safetensors size, forward latency on a fixed batch of real text and, for SmolLM2, greedy ``generate``
tokens/s at batch 1.

Timings are medians over repetitions in which the variants run round-robin (the order rotated every
round) after a warm-up, so drift on a shared machine hits every variant alike; speed-up is
``dense median / variant median``, and the 25th-75th percentiles of the per-round ratios show the spread.
Results go to ``<output_dir>/head_pruning_speed.{json,png}`` and a markdown table to stdout.

Run: ``.venv/bin/python benchmarks/head_pruning_speed.py`` (``--quick`` for a smoke run of about 30 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import DatasetDict
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from hf_gradprune import compute_head_importance, prune_heads, select_heads_to_prune
from hf_gradprune.core.masks import apply_masks
from hf_gradprune.testing import load_rotten_tomatoes, minilm_path, smollm2_gguf
from hf_gradprune.weights.scoring import compute_weight_importance
from hf_gradprune.weights.sparsity import compute_weight_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_header, speed, time_interleaved

NAME = "head_pruning_speed"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/structured/selection.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
    "src/hf_gradprune/weights/criteria.py",
)
RESULTS = Path(__file__).resolve().parent / "results"
MINILM_HEADS_PER_LAYER = (1, 3, 6)
WEIGHT_SPARSITY = 0.5
# Reviews joined into one row of the timed batches: enough text to fill --seq_len tokens without padding.
REVIEWS_PER_ROW = 12
IMPORTANCE_BATCH_SIZE = 8
QUICK = {
    "repeats": 2,
    "warmup": 1,
    "seq_len": 32,
    "minilm_batch_size": 4,
    "smollm2_batch_size": 2,
    "new_tokens": 4,
    "importance_batches": 1,
}


@dataclass
class Variant:
    """A model to time: its name in the results and the query heads it lost."""

    name: str
    model: PreTrainedModel
    heads_removed: int


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags; ``--quick`` swaps in the :data:`QUICK` defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="Timed rounds per measurement (>= 2).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls per variant before timing.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per row of the forward batches.")
    parser.add_argument("--minilm_batch_size", type=int, default=32, help="Rows of the MiniLM forward batch.")
    parser.add_argument(
        "--smollm2_batch_size", type=int, default=8, help="Rows of the SmolLM2 forward batch."
    )
    parser.add_argument(
        "--new_tokens", type=int, default=32, help="Tokens SmolLM2 generates (greedy, batch 1)."
    )
    parser.add_argument(
        "--importance_batches",
        type=int,
        default=4,
        help=f"Batches of {IMPORTANCE_BATCH_SIZE} rows for head importance.",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads; None leaves torch's own choice."
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS, help="Where the JSON and PNG go.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Smoke run with tiny sizes {QUICK} (flags given explicitly still win); writes "
        f"{NAME}_quick.{{json,png}} so the full results are never overwritten.",
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive number, got {args.threads}.")
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (quartiles need two rounds), got {args.repeats}.")
    return args


def footprint(model: PreTrainedModel) -> dict[str, int]:
    """Parameters (tied ones once), non-zero parameters and bytes of the saved safetensors."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "nonzero_parameters": sum(int(torch.count_nonzero(p)) for p in params),
        "safetensors_bytes": size,
    }


def packed_batch(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], rows: int, length: int
) -> BatchEncoding:
    """``rows`` x ``length`` tokens of real text: consecutive reviews joined per row, cut to ``length``."""
    joined = [" ".join(texts[r * REVIEWS_PER_ROW : (r + 1) * REVIEWS_PER_ROW]) for r in range(rows)]
    return tokenizer(joined, padding="max_length", truncation=True, max_length=length, return_tensors="pt")


def forward_call(model: PreTrainedModel, batch: Mapping[str, Any]) -> Callable[[], torch.Tensor]:
    """A no-grad forward of ``model`` on ``batch`` returning the logits."""

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch).logits

    return call


def measure(
    variants: Sequence[Variant], batch: Mapping[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Footprint, logits shape and interleaved forward latency of every variant; the first is dense."""
    calls = {v.name: forward_call(v.model, batch) for v in variants}
    rows = [
        {
            "name": v.name,
            "heads_removed": v.heads_removed,
            **footprint(v.model),
            "logits_shape": list(calls[v.name]().shape),
        }
        for v in variants
    ]
    for row in rows:
        row["parameters_fraction"] = row["parameters"] / rows[0]["parameters"]
    shapes = {tuple(row["logits_shape"]) for row in rows}
    if len(shapes) != 1:
        raise RuntimeError(f"Pruned variants changed the logits shape: {shapes}.")
    times = time_interleaved(calls, args.repeats, args.warmup)
    dense = times[variants[0].name]
    for row in rows:
        row["forward"] = speed(times[row["name"]], dense)
    return rows


def bench_minilm(args: argparse.Namespace, reviews: DatasetDict) -> dict[str, Any]:
    """MiniLM: dense, heads removed per layer by importance, and unstructured magnitude sparsity."""
    torch.manual_seed(0)  # the 2-label classifier head is new: seeded, so importance is reproducible
    dense = transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    train = reviews["train"]
    importance_batches = []
    for start in range(0, IMPORTANCE_BATCH_SIZE * args.importance_batches, IMPORTANCE_BATCH_SIZE):
        rows = train[start : start + IMPORTANCE_BATCH_SIZE]
        encoded = tokenizer(
            rows["text"], padding=True, truncation=True, max_length=args.seq_len, return_tensors="pt"
        )
        importance_batches.append({**encoded, "labels": torch.tensor(rows["label"])})
    importance = compute_head_importance(dense, importance_batches, show_progress=False)
    variants = [Variant("dense", dense, 0)]
    num_layers = importance.shape[0]
    for per_layer in MINILM_HEADS_PER_LAYER:
        model = copy.deepcopy(dense)
        prune_heads(model, select_heads_to_prune(importance, per_layer=per_layer))
        variants.append(Variant(f"-{per_layer} head/layer", model, per_layer * num_layers))
    sparse = copy.deepcopy(dense)
    scores = compute_weight_importance(sparse, method="magnitude", show_progress=False)
    apply_masks(sparse, compute_weight_masks(scores, WEIGHT_SPARSITY))
    variants.append(Variant(f"{WEIGHT_SPARSITY:.0%} unstructured", sparse, 0))
    batch = packed_batch(tokenizer, reviews["test"]["text"], args.minilm_batch_size, args.seq_len)
    return {
        "model": "all-MiniLM-L6-v2 + 2-label head (6 layers x 12 heads)",
        "forward_batch": list(batch["input_ids"].shape),
        "variants": measure(variants, batch, args),
    }


def generate_call(model: PreTrainedModel, prompt: BatchEncoding, new_tokens: int) -> Callable[[], None]:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt``."""
    expected = prompt["input_ids"].shape[1] + new_tokens

    def call() -> None:
        with torch.inference_mode():
            out = model.generate(
                **prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        if out.shape[1] != expected:
            raise RuntimeError(f"generate returned {out.shape[1]} tokens, expected {expected}.")

    return call


def bench_smollm2(args: argparse.Namespace, reviews: DatasetDict) -> dict[str, Any]:
    """SmolLM2: dense, one key/value group removed in every layer and in half of them."""
    folder, gguf_file = smollm2_gguf()
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, quantization_config=transformers.GgufConfig(dequantize=True)
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = dense.config
    group = config.num_attention_heads // config.num_key_value_heads
    train_texts = list(reviews["train"]["text"])
    importance_batches = []
    for index in range(args.importance_batches):
        texts = train_texts[index * IMPORTANCE_BATCH_SIZE * REVIEWS_PER_ROW :]
        encoded = packed_batch(tokenizer, texts, IMPORTANCE_BATCH_SIZE, args.seq_len)
        importance_batches.append({**encoded, "labels": encoded["input_ids"]})
    importance = compute_head_importance(dense, importance_batches, show_progress=False)
    chosen = select_heads_to_prune(importance, per_layer=1, num_key_value_heads=config.num_key_value_heads)
    # Half the layers: those whose least important group scores lowest.
    by_score = sorted(chosen, key=lambda layer: float(importance[layer, chosen[layer]].sum()))
    half = {layer: chosen[layer] for layer in sorted(by_score[: len(chosen) // 2])}
    variants = [Variant("dense", dense, 0)]
    for name, heads in (
        (f"-1 kv group x {len(chosen)} layers", chosen),
        (f"-1 kv group x {len(half)} layers", half),
    ):
        model = copy.deepcopy(dense)
        prune_heads(model, heads)
        variants.append(Variant(name, model, group * len(heads)))
    batch = packed_batch(tokenizer, reviews["test"]["text"], args.smollm2_batch_size, args.seq_len)
    batch["use_cache"] = False
    rows = measure(variants, batch, args)
    prompt = tokenizer(reviews["test"]["text"][:1], return_tensors="pt")
    calls = {v.name: generate_call(v.model, prompt, args.new_tokens) for v in variants}
    times = time_interleaved(calls, args.repeats, args.warmup)
    dense_times = times[variants[0].name]
    for row in rows:
        row["generate"] = speed(times[row["name"]], dense_times)
        row["generate"]["tokens_per_s"] = args.new_tokens / (row["generate"]["median_ms"] / 1e3)
    return {
        "model": f"SmolLM2-135M-Instruct, GGUF dequantised to float32 ({config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} q / {config.num_key_value_heads} kv heads)",
        "forward_batch": list(batch["input_ids"].shape),
        "generate": {
            "batch": 1,
            "prompt_tokens": prompt["input_ids"].shape[1],
            "new_tokens": args.new_tokens,
        },
        "half_layers": sorted(half),
        "variants": rows,
    }


def _ratio(timing: Mapping[str, float]) -> str:
    """``speed-up (round p25–p75)``."""
    return f"{timing['speedup']:.3f} ({timing['speedup_round_p25']:.2f}–{timing['speedup_round_p75']:.2f})"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per variant: size, forward latency and speed-up, and generation for SmolLM2."""
    lines = [
        "| Model | Variant | Heads removed | Params (% dense) | Safetensors MB | Forward ms "
        "| Forward speed-up (round IQR) | Generate tok/s | Generate speed-up (round IQR) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("minilm", "MiniLM"), ("smollm2", "SmolLM2-135M")):
        for row in results[key]["variants"]:
            fwd, gen = row["forward"], row.get("generate")
            generated = f"{gen['tokens_per_s']:.1f} | {_ratio(gen)}" if gen else "– | –"
            lines.append(
                f"| {label} | {row['name']} | {row['heads_removed']} | {row['parameters_fraction']:.1%} "
                f"| {row['safetensors_bytes'] / 1e6:.1f} | {fwd['median_ms']:.0f} | {_ratio(fwd)} "
                f"| {generated} |"
            )
    return "\n".join(lines)


def save_chart(results: dict[str, Any], path: Path) -> None:
    """Bar chart of the speed-ups over dense, with the quartiles of the per-round ratios as lines."""
    bars = [
        (f"{label}\n{row['name']}", row[measure], color)
        for key, measure, label, color in (
            ("minilm", "forward", "MiniLM forward", "tab:blue"),
            ("smollm2", "forward", "SmolLM2 forward", "tab:orange"),
            ("smollm2", "generate", "SmolLM2 generate", "tab:green"),
        )
        for row in results[key]["variants"][1:]
    ]
    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(bars))
    axes.bar(positions, [s["speedup"] for _, s, _ in bars], color=[c for _, _, c in bars])
    axes.vlines(
        positions,
        [s["speedup_round_p25"] for _, s, _ in bars],
        [s["speedup_round_p75"] for _, s, _ in bars],
        color="black",
    )
    for x, (_, s, _) in zip(positions, bars, strict=True):
        axes.annotate(
            f"{s['speedup']:.2f}",
            (x, max(s["speedup"], s["speedup_round_p75"])),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
        )
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(list(positions), [name for name, _, _ in bars], fontsize=8)
    axes.set_ylabel("speed-up over dense (dense median / variant median)")
    machine = results["machine"]
    axes.set_title(
        f"Inference speed-up from pruning, {results['date'][:10]}, {machine['processor']}, "
        f"{machine['torch_threads']} threads, torch {machine['torch']} (lines: per-round ratio IQR)",
        fontsize=9,
    )
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both benchmarks, write the JSON and PNG, print the table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus / 2:
        print(f"Warning: load average {load:.1f} on {cpus} CPUs; timings will be noisy.", file=sys.stderr)
    results: dict[str, Any] = results_header(NAME, args)
    reviews = load_rotten_tomatoes()
    results["minilm"] = bench_minilm(args, reviews)
    results["smollm2"] = bench_smollm2(args, reviews)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    stem = f"{NAME}_quick" if args.quick else NAME
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    save_chart(results, args.output_dir / f"{stem}.png")
    machine = results["machine"]
    print(
        f"{results['date']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"{args.repeats} interleaved rounds, {results['runtime_s']} s\n"
    )
    print(markdown_table(results))
    print(f"\nWrote {args.output_dir / stem}.json and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
