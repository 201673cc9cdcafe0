"""``PruningMixin`` for any ``Trainer`` subclass, and ``PruningTrainer``: a ``transformers.Trainer`` with
:class:`GradientPruningCallback` built in."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from ..core.masks import get_masks
from ..core.record import PruningRecord
from ..io.checkpoint import load_pruned, save_pruned
from ..io.export import check_exportable
from .arguments import PruningArguments
from .callback import GradientPruningCallback
from .checkpoints import CheckpointMixin, checkpoint_to_resume
from .distillation import DistillationParts, Distiller, frozen_copy
from .publishing import PublishingMixin
from .run_checks import refuse_sharded_training

#: Where a run saves the copy of the model it distils from (``--distill_alpha`` without a teacher path).
TEACHER_DIR = "distillation_teacher"


class PruningMixin(PublishingMixin, CheckpointMixin):
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
        refuse_sharded_training(
            pruning_args,
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
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
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
