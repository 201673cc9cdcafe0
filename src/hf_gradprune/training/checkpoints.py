"""The ``Trainer``'s checkpoints as :class:`PruningMixin` writes and reads them: whole or not at all (a
process killed while saving leaves the previous files), with the pruning state beside the weights, and
without pickle (training arguments, optimizer, scheduler, RNG and scaler state as JSON and safetensors);
under FSDP2 gathered whole. Only what that policy needs overrides the ``Trainer``; the rest is its own
code."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedModel
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.masks import MASKS_FILENAME
from ..io.checkpoint import load_pruned
from ..io.folders import read_state_dict, stored_shapes
from ..io.saving import finish_interrupted_save, saving_into
from .state import has_state, load_state, save_state

TRAINING_ARGS_JSON = "training_args.json"
# What a checkpoint holds beyond the model: not pushed to the repository's root.
TRAINING_STATE_FILES = ("optimizer.*", "scheduler.*", "scaler.*", "rng_state*", TRAINER_STATE_NAME)

logger = logging.getLogger(__name__)


def _renamed(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint``'s safetensors weights hold keys ``model`` does not have (saved in the Hub layout
    of a family transformers renames on load). A checkpoint without them (a LoRA adapter's, a pickled
    ``pytorch_model.bin``) is the ``Trainer``'s to load."""
    try:
        stored = stored_shapes(Path(checkpoint))
    except (FileNotFoundError, ValueError):
        return False
    return bool(set(stored) - set(model.state_dict()))


def _check_complete(checkpoint: str | os.PathLike) -> None:
    """A checkpoint the Trainer finished writing: ``trainer_state.json`` is its last file."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ValueError(
            f"Can't find a valid checkpoint at {os.fspath(checkpoint)}: there is no such folder. Pass a "
            "`checkpoint-N` folder the Trainer wrote, or `resume_from_checkpoint=True` to take the last "
            "complete one of `output_dir`."
        )
    finish_interrupted_save(folder)
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"`resume_from_checkpoint` {os.fspath(checkpoint)!r} has no {TRAINER_STATE_NAME}, the file the "
            "Trainer writes last: the save was cut short. Resume from an earlier checkpoint, or pass "
            "`resume_from_checkpoint=True` to take the last complete one."
        )


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest ``checkpoint-N`` of ``output_dir`` the Trainer finished writing; newer ones cut short
    (no ``trainer_state.json``) are passed over with a warning."""
    folders = sorted(
        (int(match.group(1)), path)
        for path in (Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if Path(output_dir).is_dir() else [])
        if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)) and path.is_dir()
    )
    for _, path in reversed(folders):
        finish_interrupted_save(path)
        if (path / TRAINER_STATE_NAME).is_file():
            return os.fspath(path)
        logger.warning("Skipping %s: its save was cut short (no %s).", path, TRAINER_STATE_NAME)
    skipped = f" ({len(folders)} cut short, skipped)" if folders else ""
    raise ValueError(f"No valid checkpoint found in output directory ({os.fspath(output_dir)}){skipped}.")


def checkpoint_to_resume(
    resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike
) -> str | None:
    """The folder ``train(resume_from_checkpoint=...)`` resumes from: the last complete checkpoint of
    ``output_dir`` for ``True``, a given folder once checked complete, ``None`` for a fresh run."""
    if resume_from_checkpoint is True:
        return last_complete_checkpoint(output_dir)
    if resume_from_checkpoint:
        _check_complete(resume_from_checkpoint)
        return os.fspath(resume_from_checkpoint)
    return None


class CheckpointMixin:
    """Checkpoints without pickle, written whole, for :class:`PruningMixin` (its host ``Trainer``'s
    ``_save``, ``_load_from_checkpoint`` and training-state methods, each converting the ``Trainer``'s own
    output or input)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save`` into a temporary folder, with the masks, schedule position and JSON training
        arguments, moved into place when whole (a process killed while saving leaves the previous files)."""
        if not self.args.should_save:
            return super()._save(output_dir, state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        # An earlier save's pickled arguments, or masks this model no longer has, go.
        with saving_into(folder, owned=(TRAINING_ARGS_NAME, MASKS_FILENAME)) as partial:
            super()._save(str(partial), state_dict)
            (partial / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (partial / TRAINING_ARGS_JSON).write_text(self._portable_args_json())
            self.pruning_callback.save_pruning_state(self.model, partial)
        return None

    def _portable_args_json(self) -> str:
        """The training arguments as JSON, absolute local paths reduced to their last component (the file
        may be pushed to the Hub; tokens are already masked by ``TrainingArguments.to_dict``)."""
        args = {
            k: Path(v).name if isinstance(v, str) and os.path.isabs(v) else v
            for k, v in self.args.to_dict().items()
        }
        return json.dumps(args, indent=2, sort_keys=True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Overridden for the pickle-free policy and FSDP2: JSON + safetensors instead of ``optimizer.pt``,
        and under FSDP2 the whole optimizer state by parameter name (the Trainer writes sharded files)."""
        if self.is_fsdp_enabled:  # every rank gives its shards, the first writes them whole (by name)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=options)
        else:
            optimizer = self.optimizer.state_dict()
        if self.args.should_save:
            save_state(optimizer, output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Reads what :meth:`_save_optimizer_and_scheduler` wrote (under FSDP2 every rank keeps its shards);
        a plain ``Trainer``'s pickled checkpoint goes to the ``Trainer``."""
        if checkpoint is None or not has_state(checkpoint, "optimizer"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        if self.is_fsdp_enabled:  # every rank reads the whole state and keeps its shards
            options = StateDictOptions(full_state_dict=True)
            state = load_state(checkpoint, "optimizer")
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, state, options=options)
        else:
            self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """``Trainer._load_from_checkpoint``; under FSDP2, every rank reads its shards from the whole
        safetensors weights that :meth:`save_model` wrote (no pickle, no sharded checkpoint format). Weights
        saved under other names than the model's (transformers 5 saves ViT and others in their Hub layout and
        the Trainer loads them unconverted, so that nothing loads: huggingface/transformers#48805) are read
        through ``from_pretrained``'s conversion (:func:`load_pruned`) and loaded strictly."""
        target = model or self.model
        if not self.is_fsdp_enabled:
            renamed = isinstance(target, PreTrainedModel) and _renamed(target, resume_from_checkpoint)
            if renamed:
                converted = load_pruned(resume_from_checkpoint, type(target), apply_weight_masks=False)
                target.load_state_dict(converted.state_dict())
                return None
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        options = StateDictOptions(full_state_dict=True)
        weights = read_state_dict(Path(resume_from_checkpoint))
        set_model_state_dict(target, weights, options=options)
        return None

    def _rng_stem(self) -> str:
        """The ``Trainer``'s name for this process's RNG file, without its ``.pth``."""
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        """``Trainer._save_rng_state`` (every device's generators), its pickle converted to JSON and
        safetensors (:func:`save_state`) before it reaches the checkpoint."""
        with tempfile.TemporaryDirectory() as scratch:
            super()._save_rng_state(scratch)
            (written,) = Path(scratch).iterdir()
            with safe_globals():
                states = torch.load(written, weights_only=True)
        os.makedirs(output_dir, exist_ok=True)
        save_state(states, output_dir, written.stem)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """``Trainer._load_rng_state`` (every device's generators) from the JSON and safetensors state, given
        to it as the file it reads, in a temporary folder; a plain ``Trainer``'s checkpoint as it is."""
        stem = self._rng_stem()
        if checkpoint is None or not has_state(checkpoint, stem):
            return super()._load_rng_state(checkpoint)
        with tempfile.TemporaryDirectory() as scratch:
            torch.save(load_state(checkpoint, stem), Path(scratch) / f"{stem}.pth")
            super()._load_rng_state(scratch)
        return None

    def _save_scaler(self, output_dir: str) -> None:
        """Overridden for the pickle-free policy: the gradient scaler's state as JSON + safetensors."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Reads what :meth:`_save_scaler` wrote; a plain ``Trainer``'s pickled scaler goes to the
        ``Trainer``."""
        if checkpoint is None or not has_state(checkpoint, "scaler"):
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(load_state(checkpoint, "scaler"))
        return None
