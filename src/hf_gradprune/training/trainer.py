"""``PruningMixin`` for any ``Trainer`` subclass, and ``PruningTrainer``: a ``transformers.Trainer`` with
:class:`GradientPruningCallback` built in."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedModel, Trainer
from transformers.modelcard import extract_hyperparameters_from_trainer, parse_log_history
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy
from transformers.utils.hub import PushInProgress

from ..core.masks import MASKS_FILENAME, get_masks
from ..core.record import PruningRecord
from ..io.cards import create_pruning_model_card
from ..io.checkpoint import (
    finish_interrupted_save,
    load_pruned,
    read_state_dict,
    save_pruned,
    saving_into,
    stored_shapes,
)
from ..io.export import check_exportable, export_vanilla
from ..io.figures import save_head_importance_heatmap
from ..io.hub import push_folder_to_hub, resolve_token, staged_copy
from .arguments import PruningArguments
from .callback import PRUNING_METRICS, GradientPruningCallback
from .distillation import DistillationParts, Distiller, frozen_copy
from .state import has_state, load_state, save_state

TRAINING_ARGS_JSON = "training_args.json"
#: Where a run saves the copy of the model it distils from (``--distill_alpha`` without a teacher path).
TEACHER_DIR = "distillation_teacher"
HEATMAP_FILENAME = "head_importance.png"
# The arguments of `Trainer.create_model_card`, in its order: what `push_to_hub(**kwargs)` passes on.
CARD_FIELDS = (
    "language",
    "license",
    "tags",
    "model_name",
    "finetuned_from",
    "tasks",
    "dataset_tags",
    "dataset",
    "dataset_args",
)
# What a checkpoint holds beyond the model: not pushed to the repository's root.
TRAINING_STATE_FILES = ("optimizer.*", "scheduler.*", "scaler.*", "rng_state*", TRAINER_STATE_NAME)
# Files of the repository's root that a push of a model replaces: one it does not write is deleted.
ROOT_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", HEATMAP_FILENAME, "README.md")

logger = logging.getLogger(__name__)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _timing_or_pruning(metric: str) -> bool:
    """A pruning metric, or the time the Trainer took to prepare the model (logged with every evaluation
    once the model was evaluated before training): not a column of the card's training results."""
    return metric.startswith(PRUNING_METRICS) or metric.endswith("_model_preparation_time")


def _renamed(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint``'s safetensors weights hold keys ``model`` does not have (saved in the Hub layout
    of a family transformers renames on load). A checkpoint without them (a LoRA adapter's, a pickled
    ``pytorch_model.bin``) is the ``Trainer``'s to load."""
    try:
        stored = stored_shapes(Path(checkpoint))
    except (FileNotFoundError, ValueError):
        return False
    return bool(set(stored) - set(model.state_dict()))


def _after_push(staged: Path, what: str, job: Future) -> None:
    """After a background upload: remove its snapshot, and say if it failed (nothing else reads the
    ``Trainer``'s push futures)."""
    shutil.rmtree(staged, ignore_errors=True)
    if not job.cancelled() and job.exception() is not None:
        logger.error("Pushing %s to the Hub failed: %s", what, job.exception())


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


class PruningMixin:
    """Pruning for any ``Trainer`` subclass: ``class PruningSFTTrainer(PruningMixin, SFTTrainer)``, or
    ``(PruningMixin, Seq2SeqTrainer)``; :class:`PruningTrainer` is ``(PruningMixin, Trainer)``. The mixin
    comes first (a class that puts it after a ``Trainer`` is refused when it is defined); its methods call
    the host trainer's and pass every argument of theirs through.

    Differences from ``Trainer``: the pruning callback is added; ``train(resume_from_checkpoint=...)``
    first replays the checkpoint's structural pruning and restores its masks; saves write the weight masks
    and the schedule position next to the safetensors weights, and the training arguments, optimizer,
    scheduler and RNG states as JSON and safetensors (no pickle; under FSDP2 the whole model and optimizer
    state, gathered; FSDP 1 and DeepSpeed are refused: see ``docs/scaling.md``); ``save_model``,
    ``create_model_card`` and ``push_to_hub`` write the pruning model card (``README.md``, with the
    ``Trainer``'s card arguments, hyperparameters and training results merged in) and the head-importance
    heatmap; ``push_to_hub`` uploads the output folder in one commit, and every
    ``hub_strategy`` pushes snapshots whose weights, record, masks and card agree; ``model_init`` and
    ``hyperparameter_search`` are refused (the ``Trainer`` would re-create the pruned model); the pruning
    metrics go through ``log`` to every ``report_to`` integration. With an ``eval_dataset``, the model is
    evaluated right before the first cut (unless you evaluated it already) and right after each cut (before
    any more training), so the card shows accuracy before pruning, right after it and after the recovery
    fine-tune; these evaluations and the head scores go into checkpoints, so a resumed run writes the card
    of an uninterrupted one; set ``speedup`` to a measured inference speed-up
    (dense time / pruned time) to have the card report it. Any ``nn.Module`` the ``Trainer`` trains can be
    pruned by weights; heads and FFN neurons need a registered family.

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        dataset_name (`str`, *optional*): the Hub id of the training data, for the model card (the default
            of ``create_model_card``'s ``dataset_tags``).
        evaluate_after_pruning (`bool`, *optional*, defaults to `True`): evaluate right before the first cut
            and right after each cut when there is an ``eval_dataset`` (the card's "before pruning" and
            "right after pruning" columns).
        *args, **kwargs: as for the host trainer (``transformers.Trainer``, trl's ``SFTTrainer``, ...).

    Example:
        >>> from transformers import Seq2SeqTrainer
        >>> class PruningSeq2SeqTrainer(PruningMixin, Seq2SeqTrainer):
        ...     pass
        >>> class Wrong(Seq2SeqTrainer, PruningMixin):
        ...     pass
        Traceback (most recent call last):
        ...
        TypeError: Wrong puts PruningMixin after Seq2SeqTrainer: ...
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        hosts = [k for k in mro[: mro.index(PruningMixin)] if issubclass(k, Trainer) and k is not cls]
        hosts = [k for k in hosts if not issubclass(k, PruningMixin)]
        if hosts:
            raise TypeError(
                f"{cls.__name__} puts PruningMixin after {hosts[0].__name__}: the mixin's methods must come "
                "first to wrap the trainer's. Write "
                f"`class {cls.__name__}(PruningMixin, {hosts[0].__name__})`."
            )

    def __init__(
        self,
        *args: Any,
        pruning_args: PruningArguments,
        dataset_name: str | None = None,
        evaluate_after_pruning: bool = True,
        **kwargs: Any,
    ):
        try:  # the host trainer's own signature (a Trainer subclass may take more)
            given = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        except TypeError:
            given = {}  # the host's __init__ below names the unexpected argument, as the Trainer does
        if given.get("model_init"):
            raise ValueError(
                f"{type(self).__name__} does not take `model_init`: the Trainer calls it again at every "
                "`train()` (and every hyperparameter-search trial), which would replace the pruned model "
                "with a fresh one. Pass the model itself as `model=`."
            )
        self.pruning_callback = GradientPruningCallback(pruning_args)
        self.pruning_callback.distillation_in_loss = True
        # Before the user's callbacks, so that they see each step's pruning done.
        kwargs["callbacks"] = [self.pruning_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        # Again with the accelerator's view: FSDP set by `accelerate launch`'s config is not in `args`.
        self.pruning_callback.refuse_sharded_training(
            self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None,
            self.is_deepspeed_enabled,
        )
        self.pruning_callback.mask_lora_updates(self.model)
        if pruning_args.export_vanilla:
            check_exportable(self.model, pruning_args.unit_structures)
        self.pruning_args = pruning_args
        self.params_before = sum(p.numel() for p in self.model.parameters())
        self.speedup: float | None = None
        self.dataset_name = dataset_name
        self.card_fields: dict[str, Any] = {}
        self._evaluating_pruned = False
        if evaluate_after_pruning:
            self.pruning_callback.around_cut = self._evaluate_around_cut
        #: The frozen teacher and the loss against it, built at ``train`` (``--distill_alpha`` above 0).
        self.distiller: Distiller | None = None
        self._distilled: list[DistillationParts] = []
        if pruning_args.distills:
            # The loss is a per-batch mean: the Trainer divides it over gradient accumulation steps.
            self.loss_is_scaled_for_ga = False

    @property
    def eval_before(self) -> dict[str, float] | None:
        """The metrics of the last evaluation before anything was pruned."""
        return self.pruning_callback.evaluations.get("before")

    @property
    def eval_pruned(self) -> dict[str, float] | None:
        """The metrics of the evaluation right after the last cut, before more training."""
        return self.pruning_callback.evaluations.get("pruned")

    @property
    def eval_after(self) -> dict[str, float] | None:
        """The metrics of the last evaluation after pruning and training on."""
        return self.pruning_callback.evaluations.get("after")

    def _evaluate_around_cut(self, moment: str) -> None:
        """With an evaluation set: evaluate right before the first cut (unless the user did) and right after
        each cut, before more training (the card's first two columns)."""
        if self.eval_dataset is None or (moment == "before" and (self.eval_before or self.has_pruned())):
            return
        self._evaluating_pruned = moment == "after"
        try:
            self.evaluate()
        finally:
            self._evaluating_pruned = False

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the step's pruning metrics (and, in training logs, the distillation loss's
        parts since the last log): every ``report_to`` integration sees them."""
        # A new dict: `evaluate` returns the one it logs, and its metrics are not the pruning's.
        extra = self.pruning_callback.pop_logs()
        if "loss" in logs and self._distilled:
            parts = self._distilled
            extra["distill/task"] = sum(p.task for p in parts) / len(parts)
            extra["distill/kl"] = sum(p.kl for p in parts) / len(parts)
            if parts[0].hidden is not None:
                extra["distill/hidden"] = sum(p.hidden or 0.0 for p in parts) / len(parts)
            self._distilled = []
        super().log({**logs, **extra}, *args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``Trainer.compute_loss``; in training with ``--distill_alpha`` above 0, the task loss (a per-batch
        mean) blended with the distillation from the frozen teacher (:class:`Distiller`)."""
        if self.distiller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = self.distiller.inputs(inputs)
        if super().compute_loss.__func__ is Trainer.compute_loss:  # one forward gives both
            task, outputs = super().compute_loss(model, inputs, return_outputs=True)
        else:  # a host with a loss of its own (trl's fused LM head builds no logits): our forward for them
            task = super().compute_loss(model, inputs)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        student = self.accelerator.unwrap_model(model)
        loss, parts = self.distiller.loss(student, task, outputs, inputs)
        if parts.kl == 0.0 and self.has_pruned():
            raise RuntimeError(
                "The distillation KL is exactly 0 after a cut: the teacher computes the student's outputs (a "
                "copy that still calls the student?), so distillation would do nothing. Please report this "
                f"with your trainer class ({type(self).__name__})."
            )
        self._distilled.append(parts)
        return (loss, outputs) if return_outputs else loss

    def _build_distiller(self, resume_from_checkpoint: str | None) -> None:
        """The teacher of ``--distill_alpha``: ``--teacher_model_name_or_path``, or the model as it is now
        (before the first cut), saved once in ``<output_dir>/distillation_teacher`` and read back there when
        resuming."""
        args = self.pruning_args
        saved = Path(self.args.output_dir) / TEACHER_DIR
        path = args.teacher_model_name_or_path or (saved if resume_from_checkpoint else None)
        if path is None:
            teacher = frozen_copy(self.model)
            if self.args.should_save:
                save_pruned(teacher, saved)
        else:
            if not args.teacher_model_name_or_path and not saved.is_dir():
                raise ValueError(
                    f"Resuming a run with `--distill_alpha {args.distill_alpha}` needs its teacher, saved at "
                    f"{saved} when the run began, and it is not there: restore it, or give "
                    "`--teacher_model_name_or_path`."
                )
            config = getattr(self.model, "config", None)
            plain = None if config is not None else frozen_copy(self.model)  # a weight-pruned nn.Module
            parameter = next(self.model.parameters())
            # A fresh model without masks: the Distiller freezes it, no copy needed.
            teacher = load_pruned(path, model=plain, apply_weight_masks=False)
            teacher = teacher.to(device=parameter.device, dtype=parameter.dtype)
        self.distiller = Distiller(
            teacher, args.distill_alpha, args.distill_temperature, args.distill_hidden_states
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after replaying the checkpoint's pruning when resuming, or making the step-0
        head cut before the optimizer exists and DDP wraps the model."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint:
            _check_complete(resume_from_checkpoint)
        if self.pruning_args.distills and self.distiller is None:
            self._build_distiller(resume_from_checkpoint)
        if resume_from_checkpoint:
            self.pruning_callback.resume_from(resume_from_checkpoint, self.model)
        elif self.state.global_step == 0:
            self.pruning_callback.note_already_pruned(self.model)
            self.pruning_callback.prune_structures_before_training(
                self.model, self.get_train_dataloader(), show_progress=not self.args.disable_tqdm
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

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

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **kwargs: Any,
    ) -> dict[str, float]:
        """The host's ``evaluate`` (``kwargs``: its own, such as ``Seq2SeqTrainer``'s ``max_length`` and
        ``num_beams``); the metrics under the default ``metric_key_prefix`` (``"eval"``) are kept as
        ``eval_before`` pruning, ``eval_pruned`` right after a cut, or ``eval_after`` (after training on), for
        the model card. Another prefix (a held-out test set, say) is evaluated and left out of the card."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        if metric_key_prefix == "eval":
            moment = "pruned" if self._evaluating_pruned else "after" if self.has_pruned() else "before"
            self.pruning_callback.evaluations[moment] = dict(metrics)
        return metrics

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: trials re-create the model with ``model_init``, which PruningTrainer does not take."""
        raise ValueError(
            "PruningTrainer does not run `hyperparameter_search`: every trial re-creates the model with "
            "`model_init` and would share one pruning state. Search the training hyperparameters with a "
            "plain `Trainer`, then prune with PruningTrainer and the best ones."
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus the model card and heatmap (not in periodic checkpoints); with
        ``--export_vanilla``, an ordinary transformers checkpoint (:meth:`export_vanilla`). With
        ``args.push_to_hub``, then :meth:`push_to_hub` as the ``Trainer`` does."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        self._save_with_card(output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_with_card(self, output_dir: str | None = None, repo_id: str | None = None) -> None:
        if self.pruning_args.export_vanilla:
            self.export_vanilla(output_dir, repo_id)
            return
        super().save_model(output_dir, _internal_call=True)
        self._write_model_card(output_dir, repo_id)

    def export_vanilla(self, output_dir: str | None = None, repo_id: str | None = None) -> None:
        """Write the model as an ordinary transformers checkpoint (:func:`hf_gradprune.export_vanilla`), with
        the tokenizer or processor and the model card, into ``output_dir`` (default ``args.output_dir``)."""
        if not self.is_world_process_zero():
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        export_vanilla(self.model, folder, **self._card_arguments(folder, repo_id))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """``Trainer.create_model_card``: the pruning card (:func:`hf_gradprune.create_pruning_model_card`)
        into ``args.output_dir``, as ``README.md`` beside the heatmap, with the ``Trainer``'s fields merged
        in. The fields given are kept for the cards of later saves and pushes.

        Args:
            language (`str`, *optional*): the language of the model, e.g. ``"en"``.
            license (`str`, *optional*): the license id, e.g. ``"apache-2.0"``.
            tags (`str` or `list[str]`, *optional*): tags for the card's metadata.
            model_name (`str`, *optional*): the card's title and model-index name.
            finetuned_from (`str`, *optional*): the model that was fine-tuned and pruned; a Hub id becomes the
                card's ``base_model``, a local folder "a local checkpoint" (defaults to the model's
                ``config._name_or_path``).
            tasks (`str` or `list[str]`, *optional*): the task(s); the first is the ``pipeline_tag``
                (defaults to the task of the model's head).
            dataset_tags (`str` or `list[str]`, *optional*): Hub id(s) of the dataset(s), for the metadata and
                the model-index (defaults to ``dataset_name`` given to the trainer).
            dataset (`str` or `list[str]`, *optional*): the name shown for each dataset (``"GLUE MRPC"``).
            dataset_args (`str` or `list[str]`, *optional*): each dataset's configuration (``"mrpc"``).
        """
        self._remember_card_fields(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        self._write_model_card(self.args.output_dir, self.hub_model_id)

    def _remember_card_fields(self, **fields: Any) -> None:
        unknown = sorted(set(fields) - set(CARD_FIELDS))
        if unknown:
            raise TypeError(
                f"Unexpected model card arguments {unknown}: the Trainer's card takes "
                f"{', '.join(CARD_FIELDS)}."
            )
        self.card_fields.update({k: v for k, v in fields.items() if v is not None})

    def _write_model_card(
        self, output_dir: str | os.PathLike | None = None, repo_id: str | None = None, write: bool = True
    ) -> None:
        """Write ``README.md`` (and ``head_importance.png`` when heads were scored) into ``output_dir``. Under
        FSDP2 every rank builds the card (counting the zeros of sharded weights takes them all) and the first
        writes it, unless ``write`` is false (it then only takes part)."""
        if not (self.is_world_process_zero() or self.is_fsdp_enabled):
            return
        write = write and self.is_world_process_zero()
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        card = create_pruning_model_card(
            self.model,
            vanilla=self.pruning_args.export_vanilla,
            **self._card_arguments(folder if write else None, repo_id),
        )
        if write:
            card.save(folder / "README.md")

    def _card_arguments(self, folder: Path | None, repo_id: str | None) -> dict[str, Any]:
        """What the trainer knows for the model card, with the ``Trainer``'s card fields given to
        :meth:`create_model_card` or :meth:`push_to_hub`; writes the heatmap into ``folder`` when heads were
        scored (``None``: the card is built but not written, as on every process but the first)."""
        heatmap = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if self.pruning_callback.head_importance is not None and folder is not None:
            shown = (
                self.pruning_callback.head_importance.clone()
            )  # scores at the last cut; removed heads grey
            for layer, heads in PruningRecord.from_config(self.model.config).pruned_heads.items():
                shown[layer, heads] = float("nan")
            save_head_importance_heatmap(shown, folder / HEATMAP_FILENAME)
            heatmap = HEATMAP_FILENAME
        fields, history = self.card_fields, self.state.log_history
        model_tags = getattr(self.model, "model_tags", None) or []
        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        return {
            "base_model": fields.get("finetuned_from", name_or_path),
            "task": fields.get("tasks"),
            "dataset_name": fields.get("dataset_tags", self.dataset_name),
            "dataset_pretty_name": fields.get("dataset"),
            "dataset_args": fields.get("dataset_args"),
            "language": fields.get("language"),
            "license": fields.get("license"),
            # with the host trainer's (trl's "trl", "sft"), as its own card would have them
            "tags": list(dict.fromkeys([*_as_list(fields.get("tags")), *model_tags])) or None,
            # As the Trainer names it: the repository's name, else the output folder's (never its path).
            "model_name": fields.get("model_name")
            or (repo_id or Path(self.args.output_dir).name).split("/")[-1],
            "hyperparameters": extract_hyperparameters_from_trainer(self),
            "training_results": parse_log_history(
                [{k: v for k, v in entry.items() if not _timing_or_pruning(k)} for entry in history]
            )[1],
            "pruning_args": self.pruning_args.to_dict(),
            "argument_defaults": type(self.pruning_args).defaults(),
            "params_before": self.params_before,
            "eval_before": self.eval_before,
            "eval_pruned": self.eval_pruned,
            "eval_after": self.eval_after,
            "speedup": self.speedup or self.pruning_callback.speedup,
            "heatmap_filename": heatmap,
            "repo_id": repo_id,
            "flops_seq_len": self.pruning_args.flops_seq_len,
        }

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> CommitInfo | Future | None:
        """``Trainer.push_to_hub``: save the model, masks, card and heatmap into ``args.output_dir`` and
        upload them in one commit to ``args.hub_model_id`` (default: the output folder's name in the token
        owner's namespace). Checkpoints, logs and pickles stay local.

        Args:
            commit_message (`str`, *optional*, defaults to `"End of training"`): the commit title.
            blocking (`bool`, *optional*, defaults to `True`): wait for the upload; otherwise return a
                ``Future`` of the commit.
            token (`str`, *optional*): a token with write access; defaults to ``args.hub_token``, then
                huggingface_hub's (``HF_TOKEN``, ``hf auth login``).
            revision (`str`, *optional*): the branch to commit to; defaults to ``args.hub_revision``.
            private (`bool`, *optional*): visibility of a repository created now (``args.hub_private_repo``).
            kwargs: the card's fields, as for :meth:`create_model_card` (``finetuned_from``, ``tasks``,
                ``dataset_tags``, ``dataset``, ``dataset_args``, ``language``, ``license``, ``tags``,
                ``model_name``).

        Returns:
            `huggingface_hub.CommitInfo` (a ``Future`` of it when ``blocking=False``), ``None`` off rank 0.
        """
        self._remember_card_fields(**kwargs)  # an unknown field fails before anything is saved or sent
        token = resolve_token(token if token is not None else self.args.hub_token, self._repo_name())
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._finish_current_push()  # a checkpoint's upload goes first, whole
        self._save_with_card(repo_id=self.hub_model_id)
        if not self.is_world_process_zero():
            return None
        push = functools.partial(
            push_folder_to_hub,
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            commit_message=commit_message or "End of training",
            revision=revision if revision is not None else self.args.hub_revision,
        )
        return push() if blocking else self._hub_api.run_as_future(push)

    def _repo_name(self) -> str:
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer._push_from_checkpoint`` (``hub_strategy`` ``every_save``, ``checkpoint``,
        ``all_checkpoints``), for pruned models: the repository's root becomes the checkpoint's model
        (weights, pruning record, masks, tokenizer) with a card of that model, in one commit that deletes a
        masks file or shard the checkpoint does not have; ``checkpoint`` and ``all_checkpoints`` then push the
        whole checkpoint to ``last-checkpoint`` (replaced whole) or ``checkpoint-N``. Both uploads run in the
        background from a snapshot of the checkpoint (hard links), so training, saves and checkpoint
        rotation go on without changing what is being sent; ``output_dir`` itself is left to
        :meth:`save_model`. As in the ``Trainer``, a save while an upload is running pushes nothing unless
        ``args.hub_always_push``. Under FSDP2 every rank takes part in the card; the first pushes."""
        if self.args.hub_strategy == HubStrategy.END:
            return
        first = self.is_world_process_zero()  # the only one that pushes, and knows its push in progress
        busy = first and self.push_in_progress is not None and not self.push_in_progress.is_done()
        if not first or (busy and not self.args.hub_always_push):
            if self.is_fsdp_enabled:  # counting the zeros of sharded weights for the card takes every rank
                self._write_model_card(repo_id=self.hub_model_id, write=False)
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        root = staged_copy(checkpoint_folder, output_dir, exclude=TRAINING_STATE_FILES)
        self._write_model_card(root, self.hub_model_id)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        pushes = [(root, "", ROOT_MODEL_FILES, message)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            folder = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else None
            staged = staged_copy(checkpoint_folder, output_dir)
            pushes.append((staged, folder or Path(checkpoint_folder).name, ("*",), f"{message}, checkpoint"))
        jobs = []
        for staged, path_in_repo, replaced, commit_message in pushes:
            job = self._hub_api.run_as_future(
                push_folder_to_hub,
                staged,
                self.hub_model_id,
                token=self.args.hub_token,
                commit_message=commit_message,
                revision=self.args.hub_revision,
                path_in_repo=path_in_repo,
                delete_patterns=replaced,
            )
            what = f"{Path(checkpoint_folder).name} to {path_in_repo or 'the root'}"
            job.add_done_callback(functools.partial(_after_push, staged, what))
            jobs.append(job)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    @functools.cached_property
    def _hub_api(self) -> HfApi:
        """One client for the background uploads: its single worker sends them in order."""
        return HfApi()


class PruningTrainer(PruningMixin, Trainer):
    """A ``Trainer`` that prunes heads, neurons, layers and weights as ``pruning_args`` say, and saves what it
    pruned: :class:`PruningMixin` on ``transformers.Trainer`` (its docstring lists what differs).

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        dataset_name (`str`, *optional*): the Hub id of the training data, for the model card.
        evaluate_after_pruning (`bool`, *optional*, defaults to `True`): evaluate right before the first cut
            and right after each cut when there is an ``eval_dataset``.
        *args, **kwargs: as for ``transformers.Trainer``.

    Example:
        >>> # trainer = PruningTrainer(model=model, args=training_args, train_dataset=train,
        >>> #                          pruning_args=PruningArguments(prune_heads_per_layer=1))
        >>> # trainer.train(); trainer.save_model()
    """
