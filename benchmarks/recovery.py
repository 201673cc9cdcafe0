"""Recovery: what training after (and during) the cut gives back, with and without distillation.

MiniLM on the peers' protocol (``common.py``): every row starts from the dense model fine-tuned one epoch
and trains ``--epochs`` more epochs with ``PruningTrainer`` (3 epochs in all; the peers' recipe: AdamW lr
5e-5, linear schedule, 10% warm-up), the dense model given the same epochs as the control. Rows: a quarter
of the block FLOPs (``--target_flops_ratio 0.25``, heads and neurons) cut at step 0, with and without
distillation from the model before the cut, and cut gradually (5 cuts over the first recovery epoch, 2
rounds each) with distillation; 80% and 90% unstructured weights (``obd`` per tensor) reached by a cubic
ramp over the first recovery epoch (6 updates, each scored on 128 training reviews), with and without
distillation, and 90% by magnitude with distillation beside it. Distillation:
``--distill_alpha 0.5 --distill_temperature 2 --distill_hidden_states``. Accuracy on 2,000 test reviews;
throughput of the structured models against the dense one at batch 32 x 128, interleaved, ``--threads``
threads.

SmolLM2-135M (GGUF, float32): 2:4 by the package's best one-shot configuration (Wanda, block by block, kept
weights reconstructed by least squares then Adam: ``benchmarks/llm_blockwise.py``) and half the block
FLOPs (key/value groups and FFN neurons, mask tuning), each trained ``--smollm2_steps`` steps of 4 x 128
review tokens with ``PruningTrainer`` (AdamW lr 1e-4, masks kept), with and without distillation from the
dense model (``--distill_alpha 0.5 --distill_temperature 1``, logits only); the dense model given the same
steps as the control. Perplexity on held-out reviews disjoint from the calibration and training text.

``--parts minilm_teacher`` adds two rows to the MiniLM results: a quarter of the FLOPs and 90% ``obd``, each
distilled from the dense control (the dense model given the same epochs, 0.81) instead of the model before
the cut (the one-epoch model, 0.79).

Cost: one training step with distillation against one without (the same batch, model and trainer
otherwise), interleaved, on MiniLM (batch 32) and SmolLM2 (batch 4 x 128).

Run: ``.venv/bin/python benchmarks/recovery.py`` (``--quick`` for a smoke run; ``--parts minilm`` etc.).
Writes ``results/recovery.{json,png}`` after every row.
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
from transformers import DataCollatorWithPadding, Trainer

from hf_gradprune import PruningArguments, PruningTrainer, flops_ratio, prune_to_flops, prune_weights
from hf_gradprune.core.masks import apply_masks, compute_sparsity, get_masks
from hf_gradprune.testing import load_rotten_tomatoes
from hf_gradprune.training.distillation import Distiller, frozen_copy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    RESULTS,
    SEED,
    accuracy,
    dense_minilm,
    encode,
    load_causal_lm_example,
    peer_split,
    peer_training_args,
    results_header,
    time_interleaved,
    tokenizer,
    train_rows,
    write_results,
)
from structured_speed import timed

NAME = "recovery"
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/training/trainer.py",
    "src/hf_gradprune/training/checkpoints.py",
    "src/hf_gradprune/training/callback.py",
    "src/hf_gradprune/training/reporting.py",
    "src/hf_gradprune/training/distillation.py",
    "src/hf_gradprune/training/planning.py",
    "src/hf_gradprune/structured/importance.py",
    "src/hf_gradprune/weights/scoring.py",
    "src/hf_gradprune/core/batches.py",
    "src/hf_gradprune/structured/surgery.py",
    "src/hf_gradprune/structured/cutting.py",
    "src/hf_gradprune/structured/mask_tuning.py",
)
SEQ_LEN = 128
MINILM_DISTILL = {"distill_alpha": 0.5, "distill_temperature": 2.0, "distill_hidden_states": True}
SMOLLM2_DISTILL = {"distill_alpha": 0.5, "distill_temperature": 1.0}
SMOLLM2_CUTS = ("dense", "2:4", "half FLOPs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["minilm", "cost", "smollm2"])
    parser.add_argument("--epochs", type=int, default=2, help="MiniLM recovery epochs after the dense one.")
    parser.add_argument("--train_reviews", type=int, default=4000)
    parser.add_argument("--test_reviews", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing.")
    parser.add_argument("--repeats", type=int, default=10, help="Interleaved timing rounds.")
    parser.add_argument("--smollm2_steps", type=int, default=64, help="Recovery steps of 4 x 128 tokens.")
    parser.add_argument("--smollm2_calibration", type=int, default=8, help="Batches of 4 x 128 tokens.")
    parser.add_argument("--smollm2_eval_batches", type=int, default=16, help="Held-out batches of 4 x 128.")
    parser.add_argument(
        "--smollm2_cuts",
        nargs="+",
        choices=SMOLLM2_CUTS,
        default=list(SMOLLM2_CUTS),
        help="SmolLM2 cuts to run; the others' rows stay in the results if their settings were the same.",
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_reviews, args.test_reviews, args.repeats = 1, 320, 200, 2
        args.smollm2_steps, args.smollm2_calibration, args.smollm2_eval_batches = 2, 1, 1
    return args


def minilm_rows(steps_per_epoch: int) -> dict[str, dict[str, Any]]:
    """Each MiniLM row's pruning arguments; gradual rows finish within the first recovery epoch."""
    end = steps_per_epoch
    cuts = ",".join(str(end * k // 5) for k in range(5))
    ramp = {
        "weight_importance": "obd",
        "sparsity_schedule": "cubic",
        "sparsity_schedule_end": end,
        "sparsity_schedule_frequency": max(1, end // 5),
        "importance_batches": 4,  # obd's per-example gradients: 128 reviews per update
    }
    quarter = {"target_flops_ratio": 0.25, "importance_batches": 16}
    return {
        "dense": {},
        "quarter FLOPs": quarter,
        "quarter FLOPs + distillation": {**quarter, **MINILM_DISTILL},
        "quarter FLOPs, gradual + distillation": {
            **quarter,
            "prune_steps": cuts,
            "prune_rounds": 2,
            "importance_batches": 8,
            **MINILM_DISTILL,
        },
        "80% obd": {"weight_sparsity": 0.8, **ramp},
        "80% obd + distillation": {"weight_sparsity": 0.8, **ramp, **MINILM_DISTILL},
        "90% obd": {"weight_sparsity": 0.9, **ramp},
        "90% obd + distillation": {"weight_sparsity": 0.9, **ramp, **MINILM_DISTILL},
        "90% magnitude + distillation": {
            "weight_sparsity": 0.9,
            **ramp,
            "weight_importance": "magnitude",
            **MINILM_DISTILL,
        },
    }


def trained_seconds(trainer: Trainer) -> float:
    """Wall-clock seconds of ``trainer``'s last ``train``."""
    return next(e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e)


def minilm_row(
    name: str, options: dict[str, Any], train: list, tests: list, args: argparse.Namespace
) -> tuple[dict[str, Any], torch.nn.Module]:
    """The one-epoch dense MiniLM trained ``--epochs`` more epochs with ``PruningTrainer`` and ``options``
    (a plain ``Trainer`` without them): its row and the model."""
    steps_per_epoch = math.ceil(len(train) / 32)
    transformers.set_seed(SEED)
    model = dense_minilm().train()
    output = CACHE / "recovery" / name.replace(" ", "_").replace("%", "").replace(",", "")
    training = peer_training_args(output, num_train_epochs=args.epochs)
    if options:
        trainer = train_rows(
            model,
            train,
            trainer_class=PruningTrainer,
            args=training,
            pruning_args=PruningArguments(**options),
            evaluate_after_pruning=False,
        )
    else:
        trainer = train_rows(model, train, args=training)
    seconds = trained_seconds(trainer)
    row = {
        "name": name,
        "pruning": options,
        "accuracy": accuracy(model, tests),
        "flops_ratio": flops_ratio(model, SEQ_LEN),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / (steps_per_epoch * args.epochs), 3),
    }
    masks = get_masks(model)
    if masks:
        row["sparsity"] = compute_sparsity(model)["overall"]
        row["revived_weights"] = sum(
            int(torch.count_nonzero(model.get_parameter(n).detach()[~m])) for n, m in masks.items()
        )
    print(json.dumps(row), flush=True)
    return row, model.eval()


def minilm(args: argparse.Namespace, results: dict[str, Any]) -> None:
    train, test = peer_split(n_train=args.train_reviews, n_test=args.test_reviews)
    tests = encode(test, 128)
    dense = dense_minilm()
    part = results["minilm"] = {
        "test_reviews": len(test),
        "recovery_epochs": args.epochs,
        "dense_one_epoch": accuracy(dense, tests),
        "rows": [],
    }
    models = {"dense, one epoch": dense}
    for name, options in minilm_rows(math.ceil(len(train) / 32)).items():
        row, model = minilm_row(name, options, train, tests, args)
        if "FLOPs" in name or name == "dense":
            models[name] = model
        part["rows"].append(row)
        write_results(results, args, plot)
    texts = [text for text, _ in test[: 32 * 12]]
    joined = [" ".join(texts[r * 12 : (r + 1) * 12]) for r in range(32)]
    batch32 = dict(
        tokenizer()(joined, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    )
    with torch.inference_mode():
        throughput = timed(models, batch32, args)
    for row in part["rows"]:
        if row["name"] in throughput:
            row["throughput_b32"] = throughput[row["name"]]["forward"]
    write_results(results, args, plot)


def minilm_teacher(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Two distilled MiniLM rows again, the teacher the dense control (given the same epochs) instead of the
    model before the cut; after ``--parts minilm``, into its results."""
    if "minilm" not in results:
        raise SystemExit("--parts minilm_teacher adds rows to the MiniLM results: run --parts minilm first.")
    train, test = peer_split(n_train=args.train_reviews, n_test=args.test_reviews)
    tests = encode(test, 128)
    folder = CACHE / f"minilm-rotten-tomatoes-dense-{1 + args.epochs}-epochs"
    if not (folder / "model.safetensors").is_file():
        _, control = minilm_row("dense", {}, train, tests, args)
        control.save_pretrained(folder)
    part = results["minilm"]
    part["control_as_teacher"] = str(folder.relative_to(CACHE.parent.parent))
    rows = minilm_rows(math.ceil(len(train) / 32))
    for name in ("quarter FLOPs + distillation", "90% obd + distillation"):
        options = {**rows[name], "teacher_model_name_or_path": str(folder)}
        row, _ = minilm_row(f"{name} from the control", options, train, tests, args)
        part["rows"].append(row)
        write_results(results, args, plot)


def smollm2_data(args: argparse.Namespace) -> tuple[Any, Any, Any, list, list, list]:
    """The example module, dense SmolLM2, tokenizer, calibration, held-out and recovery batches."""
    example = load_causal_lm_example()
    torch.manual_seed(0)
    dense, tok = example.load_smollm2()
    reviews = load_rotten_tomatoes()
    texts = reviews["train"]["text"]
    calibration_count = args.smollm2_calibration
    batches = example.text_batches(tok, texts, calibration_count + args.smollm2_steps, 4, SEQ_LEN)
    held_out = example.text_batches(tok, reviews["test"]["text"], args.smollm2_eval_batches, 4, SEQ_LEN)
    return example, dense, tok, batches[:calibration_count], held_out, batches[calibration_count:]


def causal_dataset(batches: list[dict]) -> Dataset:
    rows = torch.cat([b["input_ids"] for b in batches])
    return Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})


def causal_training(output: Path, steps: int) -> transformers.TrainingArguments:
    return peer_training_args(
        output,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        warmup_steps=0,
        num_train_epochs=1,
        data_seed=None,
    )


def smollm2_cut(name: str, dense: torch.nn.Module, calibration: list[dict]) -> torch.nn.Module:
    """A copy of ``dense`` cut as ``name`` says (``dense``: the model itself)."""
    if name == "dense":
        return dense
    cut = copy.deepcopy(dense)
    if name == "2:4":
        prune_weights(
            cut,
            calibration,
            0.5,
            method="wanda",
            pattern="2:4",
            sequential=True,
            reconstruction="least_squares_adam",
            show_progress=False,
        )
    else:
        prune_to_flops(cut, calibration, 0.5, seq_len=SEQ_LEN, mask_tuning=True, show_progress=False)
    return cut


def smollm2(args: argparse.Namespace, results: dict[str, Any]) -> None:
    example, dense, _, calibration, held_out, recovery = smollm2_data(args)
    teacher_path = CACHE / "smollm2-dense"
    if not (teacher_path / "config.json").is_file():
        dense.save_pretrained(teacher_path)
    part = {
        "recovery_steps": args.smollm2_steps,
        "recovery_tokens": args.smollm2_steps * 4 * SEQ_LEN,
        "held_out_tokens": args.smollm2_eval_batches * 4 * SEQ_LEN,
        "dense": example.perplexity(dense, held_out),
        "rows": [],
    }
    earlier = results.get("smollm2", {})
    if all(earlier.get(key) == part[key] for key in ("recovery_steps", "held_out_tokens", "dense")):
        part["rows"] = [r for r in earlier["rows"] if r["name"].split(" + ")[0] not in args.smollm2_cuts]
    results["smollm2"] = part
    cuts = {}
    for name in args.smollm2_cuts:
        start = time.perf_counter()
        cuts[name] = (smollm2_cut(name, dense, calibration), time.perf_counter() - start)
    for name, (cut, seconds) in cuts.items():
        right_after = example.perplexity(cut, held_out)  # once per cut, not per recovery run
        for distil in (False, True) if name != "dense" else (False,):
            label = name + (" + distillation" if distil else "")
            model = copy.deepcopy(cut).train()
            if get_masks(cut):
                apply_masks(model, get_masks(cut))  # a copy keeps the mask buffers, not their hooks
            transformers.set_seed(SEED)
            training = causal_training(CACHE / "recovery" / label.replace(" ", "_"), args.smollm2_steps)
            if name == "dense":
                trainer = Trainer(model=model, args=training, train_dataset=causal_dataset(recovery))
            else:
                teacher = {"teacher_model_name_or_path": str(teacher_path)}
                options = {**SMOLLM2_DISTILL, **teacher} if distil else {}
                trainer = PruningTrainer(
                    model=model,
                    args=training,
                    train_dataset=causal_dataset(recovery),
                    pruning_args=PruningArguments(**options),
                    evaluate_after_pruning=False,
                )
            trainer.remove_callback(transformers.PrinterCallback)
            trainer.train()
            train_seconds = trained_seconds(trainer)
            row = {
                "name": label,
                "prune_seconds": round(seconds, 1),
                "flops_ratio": flops_ratio(cut, SEQ_LEN),
                "perplexity_right_after": right_after,
                "perplexity": example.perplexity(model, held_out),
                "train_seconds": round(train_seconds, 1),
            }
            if get_masks(model):
                row["sparsity"] = compute_sparsity(model)["overall"]
            part["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_results(results, args, plot)
            del model, trainer


def step_cost(model: torch.nn.Module, batch: dict, distiller: Distiller, repeats: int) -> dict[str, Any]:
    """Seconds of a ``PruningTrainer`` training step on ``batch`` without and with ``distiller``."""
    plain = PruningTrainer(
        model=model, args=peer_training_args(CACHE / "scratch"), pruning_args=PruningArguments()
    )
    distilling = PruningTrainer(
        model=copy.deepcopy(model),
        args=peer_training_args(CACHE / "scratch"),
        pruning_args=PruningArguments(),
    )
    distilling.distiller = distiller
    for trainer in (plain, distilling):
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop

    def step(trainer: Trainer):
        def call() -> None:
            trainer.training_step(trainer.model, batch)
            trainer.model.zero_grad(set_to_none=True)

        return call

    times = time_interleaved({"plain": step(plain), "distillation": step(distilling)}, repeats, 1)
    plain_median = sorted(times["plain"])[len(times["plain"]) // 2]
    distil_median = sorted(times["distillation"])[len(times["distillation"]) // 2]
    return {
        "plain_ms": round(plain_median * 1e3, 1),
        "distillation_ms": round(distil_median * 1e3, 1),
        "ratio": distil_median / plain_median,
        "times_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
    }


def cost(args: argparse.Namespace, results: dict[str, Any]) -> None:
    train, _ = peer_split(n_train=args.train_reviews, n_test=0)
    rows = [tokenizer()(text, truncation=True, max_length=64) for text, _ in train[:32]]
    batch = DataCollatorWithPadding(tokenizer())(rows)
    batch["labels"] = torch.tensor([label for _, label in train[:32]])
    model = dense_minilm().train()
    part = results["cost"] = {
        "minilm_batch_32": step_cost(
            model, dict(batch), Distiller(frozen_copy(model), 0.5, 2.0, True), args.repeats
        )
    }
    print(json.dumps({k: v["ratio"] for k, v in part.items()}), flush=True)
    _, dense, _, calibration, _, _ = smollm2_data(args)
    tokens = calibration[0]["input_ids"]
    part["smollm2_batch_4x128"] = step_cost(
        dense.train(),
        {"input_ids": tokens, "labels": tokens},
        Distiller(frozen_copy(dense), 0.5, 1.0),
        max(3, args.repeats // 2),
    )
    print(json.dumps({k: v["ratio"] for k, v in part.items()}), flush=True)
    write_results(results, args, plot)


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    if "minilm" in results and results["minilm"]["rows"]:
        rows = results["minilm"]["rows"]
        names = [r["name"] for r in rows]
        left.barh(names, [r["accuracy"] for r in rows], color="tab:blue")
        dense = next((r["accuracy"] for r in rows if r["name"] == "dense"), None)
        if dense is not None:
            left.axvline(dense, color="black", linestyle="--", label="dense, same epochs")
            left.axvline(dense - 0.01, color="gray", linestyle=":", label="dense - 1 point")
            left.legend(loc="lower left", fontsize=8)
        left.set_xlim(0.6, 0.85)
        left.invert_yaxis()
        left.set_xlabel(f"accuracy, {results['minilm']['test_reviews']} test reviews")
        left.set_title(f"MiniLM, 1 + {results['minilm']['recovery_epochs']} epochs")
    if "smollm2" in results and results["smollm2"]["rows"]:
        rows = results["smollm2"]["rows"]
        names = [r["name"] for r in rows]
        right.barh(names, [r["perplexity_right_after"] for r in rows], color="lightgray", label="right after")
        right.barh(names, [r["perplexity"] for r in rows], color="tab:orange", label="after recovery")
        right.axvline(results["smollm2"]["dense"], color="black", linestyle="--", label="dense as loaded")
        right.set_xscale("log")
        right.invert_yaxis()
        right.legend(loc="upper right", fontsize=8)
        right.set_xlabel("held-out perplexity")
        right.set_title(f"SmolLM2-135M, {results['smollm2']['recovery_tokens']} recovery tokens")
    FigureCanvasAgg(figure).print_png(str(path))


def main() -> None:
    args = parse_args()
    results = results_header(NAME, args)
    stem = NAME + ("_quick" if args.quick else "")
    previous = args.output_dir / f"{stem}.json"
    if previous.is_file():  # parts run apart land in one file
        results = {**json.loads(previous.read_text()), **{k: results[k] for k in ("date", "machine")}}
        settings = {**vars(args), "output_dir": str(args.output_dir)}
        results["settings"] = {**results.get("settings", {}), **settings}
    start = time.perf_counter()
    for part in args.parts:
        parts = {"minilm": minilm, "minilm_teacher": minilm_teacher, "smollm2": smollm2, "cost": cost}
        parts[part](args, results)
    results[f"runtime_s_{'_'.join(args.parts)}"] = round(time.perf_counter() - start)
    write_results(results, args, plot)


if __name__ == "__main__":
    main()
