"""``PruningTrainer``: a ``transformers.Trainer`` with :class:`GradientPruningCallback` built in."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import CommitInfo, HfApi, get_token
from transformers import AutoConfig, Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import FFN, HEADS
from .arguments import PruningArguments
from .callback import GradientPruningCallback
from .cards import create_pruning_model_card, save_head_importance_heatmap
from .checkpoint import finish_interrupted_save, has_state, load_state, save_state, saving_into
from .export import check_exportable, export_vanilla
from .hub import push_folder_to_hub
from .lora import mask_lora_updates, masked_lora_layers
from .masks import MASKS_FILENAME, get_masks
from .record import PruningRecord
from .surgery import prune_units

TRAINING_ARGS_JSON = "training_args.json"
HEATMAP_FILENAME = "head_importance.png"

logger = logging.getLogger(__name__)


def _check_complete(checkpoint: str | os.PathLike) -> None:
    """A checkpoint the Trainer finished writing: ``trainer_state.json`` is its last file."""
    folder = Path(checkpoint)
    if folder.is_dir():
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
    raise ValueError(
        f"No complete checkpoint found in `output_dir` {os.fspath(output_dir)!r} to resume from."
    )


class PruningTrainer(Trainer):
    """A ``Trainer`` that prunes heads and weights as ``pruning_args`` say, and saves what it pruned.

    Differences from ``Trainer``: the pruning callback is added; ``train(resume_from_checkpoint=...)``
    first replays the checkpoint's structural pruning and restores its masks; saves write the weight masks
    and the schedule position next to the safetensors weights, and the training arguments, optimizer,
    scheduler and RNG states as JSON and safetensors (no pickle; FSDP and DeepSpeed are refused: see
    ``docs/scaling.md``); ``save_model`` and ``push_to_hub`` also write a model card (``README.md``) and the
    head-importance heatmap; ``push_to_hub`` uploads the output folder in one commit; the pruning metrics go
    through ``log`` to every ``report_to`` integration. With an ``eval_dataset``, the model is evaluated
    right after each cut (before any more training), so the card shows accuracy before pruning, right
    after it and after the recovery fine-tune; set ``speedup`` to a measured inference speed-up (dense
    time / pruned time) to have the card report it. Any ``nn.Module`` the ``Trainer`` trains can be
    pruned by weights; heads and FFN neurons need a registered family.

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        dataset_name (`str`, *optional*): the Hub id of the training data, for the model card.
        evaluate_after_pruning (`bool`, *optional*, defaults to `True`): evaluate right after each cut when
            there is an ``eval_dataset`` (the card's "right after pruning" column).
        *args, **kwargs: as for ``transformers.Trainer``.

    Example:
        >>> # trainer = PruningTrainer(model=model, args=training_args, train_dataset=train,
        >>> #                          pruning_args=PruningArguments(prune_heads_per_layer=1))
        >>> # trainer.train(); trainer.save_model()
    """

    def __init__(
        self,
        *args: Any,
        pruning_args: PruningArguments,
        dataset_name: str | None = None,
        evaluate_after_pruning: bool = True,
        **kwargs: Any,
    ):
        self.pruning_callback = GradientPruningCallback(pruning_args)
        # Before the user's callbacks, so that they see each step's pruning done.
        kwargs["callbacks"] = [self.pruning_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        self.pruning_callback.refuse_sharded_training(self.is_fsdp_enabled, self.is_deepspeed_enabled)
        self._mask_lora_updates()
        if pruning_args.export_vanilla:
            pruned = [(HEADS, pruning_args.prunes_heads), (FFN, pruning_args.prunes_ffn)]
            check_exportable(self.model, [name for name, wanted in pruned if wanted])
        self.pruning_args = pruning_args
        self.params_before = sum(p.numel() for p in self.model.parameters())
        self.eval_before: dict[str, float] | None = None
        self.eval_pruned: dict[str, float] | None = None
        self.eval_after: dict[str, float] | None = None
        self.speedup: float | None = None
        self.dataset_name = dataset_name
        self._evaluating_pruned = False
        if evaluate_after_pruning:
            self.pruning_callback.after_cut = self._evaluate_pruned

    def _mask_lora_updates(self) -> None:
        """A peft model on masked weights trains its LoRA updates masked (:func:`mask_lora_updates`), so
        that ``merge_and_unload`` gives the model that was trained; where that cannot be exact, a warning."""
        if not masked_lora_layers(self.model):
            return
        try:
            mask_lora_updates(self.model)
        except ValueError as error:
            warnings.warn(f"{error} The LoRA update trains dense.", stacklevel=3)

    def _evaluate_pruned(self) -> None:
        """Evaluate right after a cut (before more training), when there is an evaluation set."""
        if self.eval_dataset is None:
            return
        self._evaluating_pruned = True
        try:
            self.evaluate()
        finally:
            self._evaluating_pruned = False

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the step's pruning metrics: every ``report_to`` integration sees them."""
        logs.update(self.pruning_callback.pop_logs())
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after replaying the checkpoint's pruning when resuming, or making the step-0
        head cut before the optimizer exists and DDP wraps the model."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint:
            _check_complete(resume_from_checkpoint)
        if resume_from_checkpoint:
            self._replay_pruning(resume_from_checkpoint)
        elif self.state.global_step == 0:
            self.pruning_callback.note_already_pruned(self.model)
            self.pruning_callback.prune_structures_before_training(
                self.model, self.get_train_dataloader(), show_progress=not self.args.disable_tqdm
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _replay_pruning(self, checkpoint: str | os.PathLike) -> None:
        self.pruning_callback.resume_from(checkpoint)
        if not (Path(checkpoint) / "config.json").is_file():
            return  # a model of no registered family: only weight masks, restored at train begin
        saved = PruningRecord.from_config(AutoConfig.from_pretrained(checkpoint))
        current = PruningRecord.from_config(self.model.config)
        missing = {
            name: {
                layer: [u for u in units if u not in current.removed(name, layer)]
                for layer, units in layers.items()
            }
            for name, layers in saved.pruned.items()
        }
        missing = {name: {k: v for k, v in layers.items() if v} for name, layers in missing.items()}
        if any(missing.values()):
            prune_units(self.model, missing, allow_empty=True)

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

    # --- training state without pickle ----------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, "optimizer"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))
        return None

    def _rng_stem(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        os.makedirs(output_dir, exist_ok=True)
        save_state(states, output_dir, self._rng_stem())
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, self._rng_stem()):
            return super()._load_rng_state(checkpoint)
        states = load_state(checkpoint, self._rng_stem())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.random.set_rng_state_all(states["cuda"])
        return None

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, "scaler"):
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(load_state(checkpoint, "scaler"))
        return None

    def has_pruned(self) -> bool:
        """Whether any structure or weight has been pruned so far."""
        record = PruningRecord.from_config(getattr(self.model, "config", None))
        return not record.is_empty() or bool(get_masks(self.model))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``; the metrics are kept as ``eval_before`` pruning, ``eval_pruned`` right after
        a cut, or ``eval_after`` (after training on), for the model card."""
        metrics = super().evaluate(*args, **kwargs)
        if self._evaluating_pruned:
            self.eval_pruned = dict(metrics)
        elif self.has_pruned():
            self.eval_after = dict(metrics)
        else:
            self.eval_before = dict(metrics)
        return metrics

    def save_model(
        self, output_dir: str | None = None, _internal_call: bool = False, **card_kwargs: Any
    ) -> None:
        """``Trainer.save_model``, plus the model card and heatmap (not in periodic checkpoints).

        Args:
            output_dir (`str`, *optional*): defaults to ``args.output_dir``.
            card_kwargs: arguments of :func:`hf_gradprune.cards.create_pruning_model_card` (``base_model``,
                ``dataset_name``, ``task``, ``model_name`` ...).
        """
        if self.pruning_args.export_vanilla and not _internal_call:
            self.export_vanilla(output_dir, **card_kwargs)
            return
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call:
            self.write_model_card(output_dir, **card_kwargs)

    def export_vanilla(self, output_dir: str | None = None, repo_id: str | None = None, **card_kwargs: Any):
        """Write the model as an ordinary transformers checkpoint (:func:`hf_gradprune.export_vanilla`), with
        the tokenizer or processor and the model card, into ``output_dir`` (default ``args.output_dir``)."""
        if not self.is_world_process_zero():
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        export_vanilla(self.model, folder, **self._card_arguments(folder, repo_id, card_kwargs))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)

    def write_model_card(self, output_dir: str | None = None, repo_id: str | None = None, **card_kwargs: Any):
        """Write ``README.md`` (and ``head_importance.png`` when heads were scored) into ``output_dir``.

        Args:
            output_dir (`str`, *optional*): defaults to ``args.output_dir``.
            repo_id (`str`, *optional*): the Hub id the "How to load" snippet names.
            card_kwargs: arguments of :func:`hf_gradprune.cards.create_pruning_model_card`; they win over
                what the trainer knows (``base_model``, ``dataset_name``, ``task``, ``model_name`` ...).
        """
        if not self.is_world_process_zero():
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        card = create_pruning_model_card(self.model, **self._card_arguments(folder, repo_id, card_kwargs))
        card.save(folder / "README.md")

    def _card_arguments(
        self, folder: Path, repo_id: str | None, card_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """What the trainer knows for the model card, under ``card_kwargs``; writes the heatmap into
        ``folder`` when heads were scored."""
        folder.mkdir(parents=True, exist_ok=True)
        heatmap = None
        if self.pruning_callback.head_importance is not None:
            shown = (
                self.pruning_callback.head_importance.clone()
            )  # scores at the last cut; removed heads grey
            for layer, heads in PruningRecord.from_config(self.model.config).pruned_heads.items():
                shown[layer, heads] = float("nan")
            save_head_importance_heatmap(shown, folder / HEATMAP_FILENAME)
            heatmap = HEATMAP_FILENAME
        defaults = {
            "base_model": getattr(getattr(self.model, "config", None), "_name_or_path", None) or None,
            "pruning_args": self.pruning_args.to_dict(),
            "params_before": self.params_before,
            "eval_before": self.eval_before,
            "eval_pruned": self.eval_pruned,
            "eval_after": self.eval_after,
            "speedup": self.speedup or self.pruning_callback.speedup,
            "heatmap_filename": heatmap,
            "repo_id": repo_id or self.args.hub_model_id,
            "dataset_name": self.dataset_name,
            "flops_seq_len": self.pruning_args.flops_seq_len,
        }
        return {**defaults, **card_kwargs}

    def push_to_hub(
        self,
        commit_message: str = "Upload pruned model with hf_gradprune",
        token: str | None = None,
        revision: str | None = None,
        **card_kwargs: Any,
    ) -> CommitInfo | None:
        """Save model, masks, card and heatmap into ``args.output_dir`` and upload it in one commit.

        The repository is ``args.hub_model_id`` (default: the output folder's name in the token owner's
        namespace). Checkpoints, logs and pickles stay local. Returns the commit (``None`` off rank 0).
        """
        token = token or self.args.hub_token or get_token()
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        if token and "/" not in repo_id:
            repo_id = f"{HfApi(token=token).whoami()['name']}/{repo_id}"
        if self.pruning_args.export_vanilla:
            self.export_vanilla(repo_id=repo_id, **card_kwargs)
        else:
            super().save_model(_internal_call=True)
            self.write_model_card(repo_id=repo_id, **card_kwargs)
        if not self.is_world_process_zero():
            return None
        return push_folder_to_hub(
            self.args.output_dir,
            repo_id,
            token=token,
            private=self.args.hub_private_repo,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
        )
