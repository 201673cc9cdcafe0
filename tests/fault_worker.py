"""Worker of tests/test_faults.py: a pruning schedule in a process of its own, so that it can die for real.

Usage: ``python tests/fault_worker.py OUT_DIR MODE [distill]`` with MODE one of ``full`` (the whole run),
``killed`` (the same run, killed with SIGKILL while it writes checkpoint-8: model and optimizer written,
trainer state not yet) or ``resume`` (``train(resume_from_checkpoint=True)`` in OUT_DIR). ``full`` and
``resume`` save the final model with ``save_pruned`` into ``OUT_DIR/final``.

The schedule is ``tests.helpers.RAMP_PRUNING``, with checkpoints every 4 of 12 steps; with ``distill``, the
loss also distils from the model before the first cut (``DISTILLATION``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

from hf_gradprune import PruningArguments, PruningTrainer, save_pruned
from tests.helpers import RAMP_PRUNING, build_tiny, tiny_dataset

KILL_AT_STEP = 8
DISTILLATION = {"distill_alpha": 0.5, "distill_hidden_states": True}


class DyingTrainer(PruningTrainer):
    """Killed with SIGKILL part-way through writing the checkpoint of step ``KILL_AT_STEP``."""

    def _save_rng_state(self, output_dir: str) -> None:
        if self.state.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)


def main(out_dir: str, mode: str, loss: str = "task") -> None:
    pruning = PruningArguments(**RAMP_PRUNING, **(DISTILLATION if loss == "distill" else {}))
    args = TrainingArguments(
        output_dir=str(Path(out_dir) / "out"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=4,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    torch.manual_seed(0)
    trainer_class = DyingTrainer if mode == "killed" else PruningTrainer
    trainer = trainer_class(
        model=build_tiny("bert").train(), args=args, train_dataset=tiny_dataset(rows=96), pruning_args=pruning
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    save_pruned(trainer.model, Path(out_dir) / "final")


if __name__ == "__main__":
    main(*sys.argv[1:])
