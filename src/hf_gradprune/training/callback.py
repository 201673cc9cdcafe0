"""``GradientPruningCallback``: structural and weight pruning at chosen steps of a ``Trainer``."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.adapters import HEADS, get_adapter
from ..core.batches import prepare_batch, take_batches
from ..core.mask_files import load_masks
from ..core.masks import (
    MASKS_FILENAME,
    apply_masks,
    get_masks,
    reapply_masks,
)
from ..core.record import PruningRecord
from ..io.checkpoint import fit_to_checkpoint
from ..structured.flops import measure_speedup
from ..structured.rounds import prune_in_rounds, prune_layers_by_importance
from ..structured.surgery import prune_to_record
from ..weights.pruning import prune_weights, zero_pruned_optimizer_state
from .arguments import PruningArguments
from .distillation import frozen_copy
from .lora import mask_lora_updates
from .planning import PruningPlan
from .pruning_state import STATE_FILENAME, read_pruning_state, write_pruning_state
from .reporting import (
    PRUNING_METRICS,
    TensorBoardFigures,
    sparsity_logs,
    structure_logs,
    tag_pruned,
    target_weight_names,
)
from .run_checks import (
    already_pruned_warning,
    fsdp_version,
    refuse_sharded_training,
    refuse_structures_under_lora,
    warn_about_the_schedule,
)

logger = logging.getLogger(__name__)


class GradientPruningCallback(TrainerCallback):
    """Prunes heads and FFN neurons structurally and weights by persistent masks, as ``pruning_args`` say.

    At each pruning step it computes importance on ``importance_batches`` training batches (all-reduced
    across processes, so every rank makes the same choice), removes heads and FFN neurons (the optimizer is
    remapped in place: kept rows keep their state), optionally rescales the kept units (mask tuning), and
    masks weights. Masked weights get zero gradients and are re-masked after every optimizer step.
    Checkpoints get the masks (``pruning_masks.safetensors``) and the schedule position
    (``pruning_state.json``); the pruning record is in ``config.json``.

    Metrics (``prune/sparsity``, ``prune/heads_layer_<i>``, ``prune/ffn_layer_<i>``, ``prune/flops_ratio``)
    go through the Trainer's own logging: a log is requested at the pruning step and the metrics join its
    ``logs``, so the progress bar, ``trainer_state.json`` and every ``report_to`` integration that runs
    after this callback see them. ``PruningTrainer`` hands them to ``Trainer.log`` itself, so every
    integration does; with a plain ``Trainer`` the integrations come first in its callback list, so use
    ``PruningTrainer`` when W&B or MLflow should get them. The head-importance heatmap and the FFN sizes
    are TensorBoard figures.

    Works on any model the ``Trainer`` trains: weight pruning needs no adapter, heads and neurons need a
    registered family. Progress bars follow ``TrainingArguments.disable_tqdm``.

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars on importance passes (also
            off when ``disable_tqdm`` is set and on processes other than the local main one).

    Example:
        >>> from transformers import Trainer
        >>> callback = GradientPruningCallback(PruningArguments(prune_heads_per_layer=1))
        >>> # Trainer(model=model, args=training_args, train_dataset=data, callbacks=[callback]).train()
    """

    def __init__(self, pruning_args: PruningArguments, show_progress: bool = True):
        if not isinstance(pruning_args, PruningArguments):
            raise TypeError(f"`pruning_args` must be a PruningArguments, got {type(pruning_args).__name__}.")
        self.pruning_args = pruning_args
        #: When the cuts fall and how much each takes.
        self.plan = PruningPlan(pruning_args)
        self.show_progress = show_progress
        self.importance: dict[str, torch.Tensor] = {}
        self.weight_sparsity = 0.0
        #: Forward speed-up measured at the structural cuts (``--measure_speedup``), compounded.
        self.speedup: float | None = None
        self._progress = show_progress
        self._restored_masks: dict[str, torch.Tensor] | None = None
        self._resumed = False
        self._load_hook: torch.utils.hooks.RemovableHandle | None = None
        self._noted_pruned = False
        self._structures_done_before_training = False
        self._pending_logs: dict[str, float] = {}
        self._figures = TensorBoardFigures()
        #: Set by ``PruningTrainer``, whose loss holds the distillation term (a callback cannot).
        self.distillation_in_loss = False
        #: Called with ``"before"`` right before each cut (structural, or one-shot weights) and ``"after"``
        #: right after it, before more training: ``PruningTrainer`` evaluates there.
        self.around_cut: Callable[[str], None] | None = None
        #: Metrics kept for the model card (``"before"`` pruning, ``"pruned"`` right after a cut, ``"after"``
        #: training on), saved with the pruning state so that a resumed run has them.
        self.evaluations: dict[str, dict[str, float]] = {}

    @property
    def head_importance(self) -> torch.Tensor | None:
        """Head scores of the last structural cut, ``(num_layers, num_heads)``, or ``None``."""
        return self.importance.get(HEADS)

    # --- pruning ----------------------------------------------------------------------------------
    def prune_structures_now(
        self, model: nn.Module, batches: list, step: int, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, float]:
        """Score whole layers, heads and FFN neurons on ``batches`` and remove what ``step`` asks for (units
        in ``--prune_rounds`` rounds each scored anew); optionally rescale the kept units (mask tuning).
        Weight masks are kept. Returns the logs of the cut."""
        args = self.pruning_args
        self.plan.check_structures(model)
        reference = frozen_copy(model) if args.measure_speedup else None
        layers = self.plan.layers_to_remove(step)
        if layers:
            self.importance[get_adapter(model).whole_layers.name] = prune_layers_by_importance(
                model, batches, layers, args.layer_importance, optimizer, show_progress=self._progress
            )["importance"]
        names = args.flops_structures if args.prunes_by_flops else args.unit_structures
        report = self._prune_units(model, batches, step, names, optimizer) if names else {}
        logs = {k: v for k, v in report.items() if k.startswith(PRUNING_METRICS)}
        logs.update(structure_logs(model, self.pruning_args.flops_seq_len))
        cut = layers or report.get("units") or report.get("layers")
        return self._speedup_logs(reference if cut else None, model, batches, logs)

    def _prune_units(
        self,
        model: nn.Module,
        batches: list,
        step: int,
        names: list[str],
        optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, Any]:
        """Remove the units (and, under a FLOPs budget, the whole layers) of ``names`` that ``step`` asks for,
        in ``--prune_rounds`` rounds: the report of :func:`prune_in_rounds`."""
        args = self.pruning_args
        rounds = self.plan.rounds(model, step)
        plan = self.plan.chooser(model, step, rounds)

        def choose(importance: dict[str, torch.Tensor], index: int) -> dict[str, dict[int, list[int]]]:
            self.importance.update(importance)
            return plan(importance, index)

        return prune_in_rounds(
            model,
            batches,
            names,
            choose,
            rounds=rounds,
            mask_tuning=args.mask_tuning,
            mask_tuning_method=args.mask_tuning_method,
            accumulate=args.head_importance_accumulate,
            optimizer=optimizer,
            allow_empty=args.allow_empty_layers,
            show_progress=self._progress,
        )

    def _speedup_logs(
        self, reference: nn.Module | None, model: nn.Module, batches: list, logs: dict[str, float]
    ) -> dict[str, float]:
        """``logs`` with ``prune/speedup``, the forward of ``reference`` against ``model``'s, multiplied into
        the speed-up of the cuts before, when ``--measure_speedup`` kept a ``reference``."""
        if reference is not None:
            was_training = model.training
            ratio = measure_speedup(reference, model, prepare_batch(model, batches[0]))
            model.train(was_training)
            self.speedup = (self.speedup or 1.0) * ratio
            logs["prune/speedup"] = self.speedup
        return logs

    def prune_weights_now(
        self, model: nn.Module, batches: list, sparsity: float, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Score the target weights on ``batches``, mask them to ``sparsity``; pruned entries stay pruned."""
        args = self.pruning_args
        masks = prune_weights(
            model,
            batches if args.weights_read_data else None,
            sparsity,
            method=args.weight_importance,
            scope=args.sparsity_scope,
            pattern=args.sparsity_pattern,
            target_modules=args.prune_target_modules,
            sequential=args.sequential_calibration,
            gblm_alpha=args.gblm_alpha,
            show_progress=self._progress,
            reconstruction=args.weight_reconstruction,
            allocation=args.weight_sparsity_allocation,
            scoring_passes=args.scoring_passes,
        )
        if optimizer is not None:
            zero_pruned_optimizer_state(optimizer, model, masks)
        self.mask_lora_updates(model)
        self.weight_sparsity = sparsity

    def mask_lora_updates(self, model: nn.Module) -> None:
        """A peft model on masked weights trains its LoRA updates masked (:func:`mask_lora_updates`), so that
        ``merge_and_unload`` gives the model that was trained; where that cannot be exact, a warning."""
        try:
            mask_lora_updates(model)
        except ValueError as error:
            warnings.warn(f"{error} The LoRA update trains dense.", stacklevel=3)

    def prune_structures_before_training(
        self, model: nn.Module, dataloader: Iterable, show_progress: bool = True
    ) -> None:
        """Make the step-0 structural cut now, before the Trainer builds its optimizer and wraps the model.

        ``PruningTrainer.train`` calls this; it is what makes step-0 structural pruning work under DDP,
        which cannot follow parameters that change shape once it wraps the model.
        """
        if not self.plan.structure_step(0):
            return
        self._progress = self.show_progress and show_progress
        batches = take_batches(dataloader, self.pruning_args.importance_batches)
        self._around_cut("before")
        self._pending_logs.update(self.prune_structures_now(model, batches, 0))
        tag_pruned(model)
        self._structures_done_before_training = True
        if self.plan.weight_sparsity_at(0, self.weight_sparsity) is None:
            self._around_cut("after")

    def _around_cut(self, moment: str) -> None:
        if self.around_cut is not None:
            self.around_cut(moment)

    def _structure_steps_left(self, step: int) -> list[int]:
        if not self.pruning_args.prunes_structures:
            return []
        done = {0} if self._structures_done_before_training else set()
        return [s for s in self.pruning_args.prune_step_list if s >= step and s not in done]

    # --- events -----------------------------------------------------------------------------------
    def note_already_pruned(self, model: nn.Module) -> None:
        """Warn once, before a fresh run prunes, that ``model`` arrives pruned and how the arguments apply."""
        if self._noted_pruned:
            return
        self._noted_pruned = True
        message = already_pruned_warning(model, self.pruning_args)
        if message is not None:
            warnings.warn(message, stacklevel=3)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        refuse_sharded_training(self.pruning_args, fsdp_version(args), bool(args.deepspeed))
        refuse_structures_under_lora(self.pruning_args, kwargs.get("model"))
        if kwargs.get("model") is not None and self._load_hook is None:
            # A plain Trainer loads a checkpoint's weights before `on_train_begin`: shapes first.
            hook = functools.partial(fit_to_checkpoint, args.output_dir)
            self._load_hook = kwargs["model"].register_load_state_dict_pre_hook(hook)
        if self.pruning_args.distills and not self.distillation_in_loss:
            raise ValueError(
                f"`--distill_alpha {self.pruning_args.distill_alpha}` adds a distillation term to the loss, "
                "which a callback cannot change: train with PruningTrainer (a Trainer with this callback "
                "built in), or set `--distill_alpha 0`."
            )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        self._progress = self.show_progress and not args.disable_tqdm and state.is_local_process_zero
        if state.global_step == 0:
            self.note_already_pruned(model)
            warn_about_the_schedule(self.plan, state.max_steps)
        if self._structure_steps_left(state.global_step):
            # heads and neurons need a registered family, which has the structures the flags name: a clear
            # error now, not mid-run
            self.plan.check_structures(model)
            if args.world_size > 1:
                raise ValueError(
                    "Structural pruning during multi-process training is not supported: DDP cannot follow "
                    "parameters that change shape. Use PruningTrainer with `--prune_steps 0` (heads and "
                    "neurons are cut before DDP wraps the model), or prune them in one process first."
                )
        if state.global_step > 0 and not self._resumed:
            self._resume_found_checkpoint(args, state)
        if self._restored_masks:
            apply_masks(model, self._restored_masks)
            self.mask_lora_updates(model)
            self._restored_masks = None

    def _resume_found_checkpoint(self, args: TrainingArguments, state: TrainerState) -> None:
        """A plain ``Trainer`` resumed at ``state.global_step``: read the pruning state of its checkpoint."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if (folder / STATE_FILENAME).is_file():
            self.resume_from(folder)
        elif self.pruning_args.prunes_weights and min(self.pruning_args.prune_step_list) < state.global_step:
            warnings.warn(
                f"Training resumed at step {state.global_step} but {os.fspath(folder)!r} holds no pruning "
                "state: pruned weights would train again. Call `callback.resume_from(checkpoint, model)` "
                "before `trainer.train(resume_from_checkpoint=checkpoint)`.",
                stacklevel=2,
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        step = state.global_step
        cut = step in self._structure_steps_left(step)
        sparsity = self.plan.weight_sparsity_at(step, self.weight_sparsity)
        if cut and sparsity is None and self.weight_sparsity > 0:
            sparsity = self.weight_sparsity  # surgery removes masked rows: restore the exact sparsity
        if cut or sparsity is not None:
            batches = []  # magnitude alone reads no batch
            if cut or self.pruning_args.weights_read_data:
                batches = take_batches(kwargs["train_dataloader"], self.pruning_args.importance_batches)
            self._around_cut("before")
            if cut:
                self._pending_logs.update(self.prune_structures_now(model, batches, step, optimizer))
            if sparsity is not None:
                self.prune_weights_now(model, batches, sparsity, optimizer=optimizer)
                self._pending_logs.update(sparsity_logs(model, self.pruning_args.prune_target_modules))
            tag_pruned(model)
            if cut or self.pruning_args.sparsity_schedule == "one_shot":
                self._around_cut("after")
        if "prune/flops_ratio" in self._pending_logs:
            self._figures.write(args, state, model, self.head_importance)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._pending_logs:
            control.should_log = True  # the Trainer logs this step, and the pruning metrics with it

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        pending = self.pop_logs()
        if pending and logs is not None:
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)

    def pop_logs(self) -> dict[str, float]:
        """The pruning metrics not logged yet (they are logged once)."""
        logs, self._pending_logs = self._pending_logs, {}
        return logs

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        reapply_masks(kwargs["model"])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir() and not (folder / STATE_FILENAME).is_file():  # PruningTrainer wrote it already
            self.save_pruning_state(kwargs["model"], folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._figures.close()

    # --- state ------------------------------------------------------------------------------------
    def save_pruning_state(self, model: nn.Module, folder: str | os.PathLike) -> None:
        """Write the masks and the schedule position into ``folder`` (each file atomically)."""
        heads = self.head_importance
        facts = {
            "weight_sparsity": self.weight_sparsity,
            "speedup": self.speedup,
            "evaluations": self.evaluations,
            "head_importance": None if heads is None else heads.tolist(),
        }
        write_pruning_state(Path(folder), get_masks(model), self.pruning_args, facts)

    def resume_from(self, checkpoint: str | os.PathLike, model: nn.Module | None = None) -> None:
        """Read the masks, schedule position and card facts of ``checkpoint``; the masks are applied at train
        begin. Given the ``model``, cut it first to the checkpoint's recorded shapes (heads, neurons, layers;
        nothing for a model whose checkpoint removed none, of any family).

        The checkpoint's pruning arguments must prune what the current ones do: an argument that changes
        what is pruned is a ``ValueError`` naming it; one that does not (``importance_batches``) a warning.
        ``PruningTrainer`` calls this itself; a plain ``Trainer`` resuming from a checkpoint of its
        ``output_dir`` finds it on its own; for a checkpoint elsewhere call
        ``callback.resume_from(checkpoint, model)`` before
        ``trainer.train(resume_from_checkpoint=checkpoint)``.
        """
        folder = Path(checkpoint)
        saved = read_pruning_state(folder, self.pruning_args)
        if saved is not None:
            self.weight_sparsity = saved["weight_sparsity"]
            self.speedup = saved.get("speedup")
            self.evaluations = saved.get("evaluations", {})
            if saved.get("head_importance") is not None:
                self.importance[HEADS] = torch.tensor(saved["head_importance"])
        if model is not None:
            prune_to_record(model, PruningRecord.from_folder(folder))
        if (folder / MASKS_FILENAME).is_file():
            self._restored_masks = load_masks(folder / MASKS_FILENAME)
        self._resumed = True

    # --- logging ----------------------------------------------------------------------------------
    def target_weight_names(self, model: nn.Module) -> list[str]:
        """Parameter names of the weights ``--prune_target_modules`` selects in ``model``."""
        return target_weight_names(model, self.pruning_args.prune_target_modules)
