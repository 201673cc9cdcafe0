"""Worker of tests/test_drop_in.py: weight pruning on a ramp for a model of no registered family, in a process
of its own, so that it can die for real.

Usage: ``python tests/resume_worker.py OUT_DIR KIND MODE [TRAINER]`` with KIND ``resnet``, ``vit`` or
``plain`` (a ``PreTrainedModel`` whose config has no ``model_type``), MODE ``full`` (the whole run),
``killed`` (killed with SIGKILL while it writes checkpoint-8), ``resume`` (``resume_from_checkpoint=True``) or
``resume_path`` (``resume_from_checkpoint=OUT_DIR/out/checkpoint-4``), and TRAINER ``pruning``
(``PruningTrainer``, the default) or ``callback`` (a plain ``Trainer`` with ``GradientPruningCallback``).
``full`` and the resumed runs save the final model with ``save_pruned`` into ``OUT_DIR/final``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningTrainer, save_pruned

KILL_AT_STEP = 8
RAMP = {
    "weight_sparsity": 0.6,
    "weight_importance": "taylor",
    "sparsity_schedule": "linear",
    "sparsity_schedule_end": 10,
    "sparsity_schedule_frequency": 2,
    "importance_batches": 2,
}


class PlainConfig(PretrainedConfig):
    """A config of no ``model_type``, as transformers' own Trainer tests and many custom models have."""

    def __init__(self, width: int = 16, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class PlainModel(PreTrainedModel):
    """Two linear layers and a classifier, a ``PreTrainedModel`` of no registered family."""

    config_class = PlainConfig

    def __init__(self, config: PlainConfig):
        super().__init__(config)
        self.body = nn.Sequential(
            nn.Linear(8, config.width), nn.ReLU(), nn.Linear(config.width, config.width)
        )
        self.classifier = nn.Linear(config.width, 2)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.classifier(torch.relu(self.body(x)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "resnet":
        config = ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2
        )
        return ResNetForImageClassification(config)
    if kind == "vit":
        config = ViTConfig(
            image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        )  # fmt: skip
        return ViTForImageClassification(config)
    return PlainModel(PlainConfig())


def data(kind: str, rows: int = 96) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    if kind == "plain":
        return Dataset.from_dict(
            {"x": torch.randn(rows, 8, generator=generator).tolist(), "labels": labels.tolist()}
        )
    pixels = torch.randn(rows, 3, 16, 16, generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.tolist()}).with_format("torch")


def dying(trainer_class: type[Trainer]) -> type[Trainer]:
    class Dying(trainer_class):
        """Killed with SIGKILL part-way through writing the checkpoint of step ``KILL_AT_STEP``."""

        def _save_rng_state(self, output_dir: str) -> None:
            if self.state.global_step == KILL_AT_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_rng_state(output_dir)

    return Dying


def main(out_dir: str, kind: str, mode: str, trainer: str = "pruning") -> None:
    output = Path(out_dir) / "out"
    args = TrainingArguments(
        output_dir=str(output), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-2,
        weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="steps", save_steps=4, disable_tqdm=True,
        seed=0, data_seed=0,
    )  # fmt: skip
    pruning = PruningArguments(**RAMP)
    model = build(kind).train()
    if trainer == "pruning":
        trainer_class, kwargs = PruningTrainer, {"pruning_args": pruning}
    else:
        trainer_class, kwargs = Trainer, {"callbacks": [GradientPruningCallback(pruning)]}
    trainer_class = dying(trainer_class) if mode == "killed" else trainer_class
    run = trainer_class(model=model, args=args, train_dataset=data(kind), **kwargs)
    target = {"resume": True, "resume_path": str(output / "checkpoint-4")}.get(mode)
    run.train(resume_from_checkpoint=target)
    save_pruned(run.model, Path(out_dir) / "final")


if __name__ == "__main__":
    main(*sys.argv[1:])
