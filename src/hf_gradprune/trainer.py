"""``PruningTrainer``: a ``transformers.Trainer`` with :class:`GradientPruningCallback` built in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from .arguments import PruningArguments
from .callback import GradientPruningCallback
from .masks import get_masks
from .record import PruningRecord
from .surgery import prune_heads

TRAINING_ARGS_JSON = "training_args.json"


class PruningTrainer(Trainer):
    """A ``Trainer`` that prunes heads and weights as ``pruning_args`` say, and saves what it pruned.

    Differences from ``Trainer``: the pruning callback is added; ``train(resume_from_checkpoint=...)``
    first replays the checkpoint's head pruning and restores its masks; saves write the weight masks and
    the schedule position next to the safetensors weights and the training arguments as JSON (no pickle).

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        *args, **kwargs: as for ``transformers.Trainer``.

    Example:
        >>> # trainer = PruningTrainer(model=model, args=training_args, train_dataset=train,
        >>> #                          pruning_args=PruningArguments(prune_heads_per_layer=1))
        >>> # trainer.train(); trainer.save_model()
    """

    def __init__(self, *args: Any, pruning_args: PruningArguments, **kwargs: Any):
        self.pruning_callback = GradientPruningCallback(pruning_args)
        super().__init__(*args, **kwargs)
        self.add_callback(self.pruning_callback)
        self.pruning_args = pruning_args

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after replaying the checkpoint's pruning when resuming."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No checkpoint found in `output_dir` {self.args.output_dir!r} to resume from."
                )
        if resume_from_checkpoint:
            self._replay_pruning(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _replay_pruning(self, checkpoint: str | os.PathLike) -> None:
        saved = PruningRecord.from_config(AutoConfig.from_pretrained(checkpoint))
        current = PruningRecord.from_config(self.model.config)
        missing = {
            layer: [h for h in heads if h not in current.pruned_heads.get(layer, [])]
            for layer, heads in saved.pruned_heads.items()
        }
        if any(missing.values()):
            prune_heads(self.model, {k: v for k, v in missing.items() if v})
        self.pruning_callback.resume_from(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        pickled = folder / TRAINING_ARGS_NAME
        pickled.unlink(missing_ok=True)
        (folder / TRAINING_ARGS_JSON).write_text(self.args.to_json_string())
        self.pruning_callback.save_pruning_state(self.model, folder)

    def has_pruned(self) -> bool:
        """Whether any head or weight has been pruned so far."""
        return bool(PruningRecord.from_config(self.model.config).pruned_heads or get_masks(self.model))
