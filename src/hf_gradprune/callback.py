"""``GradientPruningCallback``: head and weight pruning at configured steps of a ``transformers.Trainer``."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import get_adapter
from .arguments import PruningArguments
from .importance import (
    compute_head_importance,
    compute_weight_importance,
    target_linear_modules,
    weight_input_dims,
    weight_layer_groups,
)
from .masks import (
    MASKS_FILENAME,
    apply_masks,
    get_masks,
    grouped_sparsity,
    load_masks,
    reapply_masks,
    save_masks,
)
from .record import PruningRecord
from .selection import compute_weight_masks, select_heads_to_prune, sparsity_at_step
from .surgery import prune_heads

STATE_FILENAME = "pruning_state.json"


def take_batches(dataloader: Iterable, count: int) -> list[Any]:
    """The first ``count`` batches of a fresh pass over ``dataloader``, leaving the training RNG untouched.

    An accelerate-prepared loader is read through its ``base_dataloader``, so the Trainer's own epoch
    iterator and accelerate's gradient-state bookkeeping are not disturbed.
    """
    loader = getattr(dataloader, "base_dataloader", dataloader)
    with torch.random.fork_rng(devices=[]):
        return list(itertools.islice(iter(loader), count))


class GradientPruningCallback(TrainerCallback):
    """Prunes heads structurally and weights by persistent masks at the steps of ``pruning_args``.

    At each pruning step it computes importance on ``importance_batches`` training batches (all-reduced
    across processes, so every rank makes the same choice), removes heads (the optimizer is remapped in
    place: kept rows keep their state) and masks weights. Masked weights get zero gradients and are
    re-masked after every optimizer step. Checkpoints get the masks (``pruning_masks.safetensors``) and the
    schedule position (``pruning_state.json``); the pruning record is in ``config.json``.

    Args:
        pruning_args (`PruningArguments`): what, how and when to prune.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars on importance passes.

    Example:
        >>> from transformers import Trainer
        >>> callback = GradientPruningCallback(PruningArguments(prune_heads_per_layer=1))
        >>> # Trainer(model=model, args=training_args, train_dataset=data, callbacks=[callback]).train()
    """

    def __init__(self, pruning_args: PruningArguments, show_progress: bool = True):
        if not isinstance(pruning_args, PruningArguments):
            raise TypeError(f"`pruning_args` must be a PruningArguments, got {type(pruning_args).__name__}.")
        self.pruning_args = pruning_args
        self.show_progress = show_progress
        self.head_importance: torch.Tensor | None = None
        self.weight_sparsity = 0.0
        self._restored_masks: dict[str, torch.Tensor] | None = None
        self._heads_done_before_training = False
        self._pending_logs: dict[str, float] = {}
        self._writer = None

    # --- schedule -------------------------------------------------------------------------------
    def head_units_to_remove(self, step: int, num_units: int) -> int | None:
        """Heads (key/value groups under GQA) to remove at ``step``, or ``None`` off-schedule.

        The target (``prune_heads_per_layer`` per layer, or ``prune_heads_fraction`` of the ``num_units``
        of the original model) is spread evenly over the prune steps.
        """
        args, steps = self.pruning_args, self.pruning_args.prune_step_list
        if not args.prunes_heads or step not in steps:
            return None
        target = args.prune_heads_per_layer
        if target is None:
            target = args.prune_heads_fraction * num_units
        done = steps.index(step)
        return round(target * (done + 1) / len(steps)) - round(target * done / len(steps))

    def weight_sparsity_at(self, step: int) -> float | None:
        """The weight sparsity to reach at ``step``, or ``None`` when the weights are not pruned then."""
        args = self.pruning_args
        if not args.prunes_weights:
            return None
        if args.sparsity_schedule == "one_shot":
            return args.weight_sparsity if step == args.prune_step_list[0] else None
        start, end, every = (
            args.sparsity_schedule_start,
            args.sparsity_schedule_end,
            args.sparsity_schedule_frequency,
        )
        if step < start or step > end or ((step - start) % every and step != end):
            return None
        target = sparsity_at_step(step, args.weight_sparsity, start, end, args.sparsity_schedule, every)
        return target if target > self.weight_sparsity else None

    # --- pruning ----------------------------------------------------------------------------------
    def prune_heads_now(self, model: PreTrainedModel, batches: list, units: int, optimizer=None) -> dict:
        """Score heads on ``batches`` and remove ``units`` per layer (or the fraction's share); keep masks."""
        args = self.pruning_args
        adapter = get_adapter(model)
        importance = compute_head_importance(
            model,
            batches,
            normalize=args.head_importance_normalize,
            accumulate=args.head_importance_accumulate,
            show_progress=self.show_progress,
        )
        self.head_importance = importance
        num_kv = adapter.num_key_value_heads(model.config)
        if args.prune_heads_per_layer is not None:
            amount = {"per_layer": units}
        else:
            group = adapter.num_heads(model.config) // num_kv
            remaining = int((~importance.isnan()).sum()) // group
            # select_heads_to_prune removes int(fraction * remaining) units: aim at the middle of the unit.
            amount = {"fraction": min((units + 0.5) / remaining, 0.999999)}
        heads = select_heads_to_prune(
            importance,
            min_heads_per_layer=args.prune_min_heads_per_layer,
            num_key_value_heads=num_kv,
            **amount,
        )
        prune_heads(model, heads, optimizer=optimizer)
        return heads

    def prune_weights_now(
        self, model: PreTrainedModel, batches: list, sparsity: float, optimizer=None
    ) -> None:
        """Score the target weights on ``batches``, mask them to ``sparsity``; pruned entries stay pruned."""
        args = self.pruning_args
        scores = compute_weight_importance(
            model,
            batches,
            method=args.weight_importance,
            target_modules=args.prune_target_modules,
            show_progress=self.show_progress,
        )
        for name, mask in get_masks(model).items():
            if name in scores:
                scores[name] = scores[name].masked_fill(~mask.to(scores[name].device), float("-inf"))
        layout = {}
        if args.sparsity_scope == "per_layer" and args.sparsity_pattern == "unstructured":
            layout["groups"] = weight_layer_groups(model, args.prune_target_modules)
        if args.sparsity_pattern != "unstructured":
            layout["input_dims"] = weight_input_dims(model, args.prune_target_modules)
        masks = compute_weight_masks(
            scores, sparsity, scope=args.sparsity_scope, pattern=args.sparsity_pattern, **layout
        )
        apply_masks(model, masks)
        if optimizer is not None:
            zero_pruned_optimizer_state(optimizer, model, masks)
        self.weight_sparsity = sparsity

    def prune_heads_before_training(self, model: PreTrainedModel, dataloader: Iterable) -> None:
        """Make the step-0 head cut now, before the Trainer builds its optimizer and wraps the model.

        ``PruningTrainer.train`` calls this; it is what makes step-0 head pruning work under DDP, which
        cannot follow parameters that change shape once it wraps the model.
        """
        if not self.pruning_args.prunes_heads or 0 not in self.pruning_args.prune_step_list:
            return
        units = self.head_units_to_remove(0, self._num_units(model))
        if units:
            self.prune_heads_now(model, take_batches(dataloader, self.pruning_args.importance_batches), units)
            self._pending_logs.update(self.head_logs(model))
        self._heads_done_before_training = True

    @staticmethod
    def _num_units(model: PreTrainedModel) -> int:
        """Prunable head units (key/value groups) in the original model."""
        adapter = get_adapter(model)
        return adapter.num_key_value_heads(model.config) * len(adapter.blocks(model))

    @staticmethod
    def head_logs(model: PreTrainedModel) -> dict[str, float]:
        """Heads left in each layer."""
        adapter = get_adapter(model)
        record, num_heads = PruningRecord.from_config(model.config), adapter.num_heads(model.config)
        return {
            f"prune/heads_layer_{layer}": len(record.kept_heads(layer, num_heads))
            for layer in range(len(adapter.blocks(model)))
        }

    def _head_steps_left(self, step: int) -> list[int]:
        done = {0} if self._heads_done_before_training else set()
        return [s for s in self.pruning_args.prune_step_list if s >= step and s not in done]

    # --- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        if (
            self.pruning_args.prunes_heads
            and args.world_size > 1
            and self._head_steps_left(state.global_step)
        ):
            raise ValueError(
                "Structural head pruning during multi-process training is not supported: DDP cannot follow "
                "parameters that change shape. Use PruningTrainer with `--prune_steps 0` (heads are cut "
                "before DDP wraps the model), or prune heads in one process first."
            )
        if self._restored_masks:
            apply_masks(model, self._restored_masks)
            self._restored_masks = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        step = state.global_step
        units = None
        if self.pruning_args.prunes_heads and step in self._head_steps_left(step):
            units = self.head_units_to_remove(step, self._num_units(model))
        sparsity = self.weight_sparsity_at(step)
        if units and sparsity is None and self.weight_sparsity > 0:
            sparsity = self.weight_sparsity  # surgery removes masked rows: restore the exact sparsity
        logs, self._pending_logs = self._pending_logs, {}
        if units or sparsity is not None:
            batches = take_batches(kwargs["train_dataloader"], self.pruning_args.importance_batches)
            if units:
                self.prune_heads_now(model, batches, units, optimizer=optimizer)
                logs.update(self.head_logs(model))
            if sparsity is not None:
                self.prune_weights_now(model, batches, sparsity, optimizer=optimizer)
                logs.update(self.sparsity_logs(model))
        if logs:
            self._log(args, state, logs)

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
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- state ------------------------------------------------------------------------------------
    def save_pruning_state(self, model: nn.Module, folder: str | os.PathLike) -> None:
        """Write the masks and the schedule position into ``folder`` (each file atomically)."""
        folder = Path(folder)
        masks = get_masks(model)
        if masks:
            save_masks(masks, folder / MASKS_FILENAME)
        state = {"weight_sparsity": self.weight_sparsity, "pruning_args": self.pruning_args.to_dict()}
        partial = folder / f".{STATE_FILENAME}.tmp"
        partial.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(partial, folder / STATE_FILENAME)

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Read the masks and schedule position of ``checkpoint``; the masks are applied at train begin.

        ``PruningTrainer`` calls this itself; with a plain ``Trainer`` call it before
        ``trainer.train(resume_from_checkpoint=checkpoint)``.
        """
        folder = Path(checkpoint)
        if (folder / STATE_FILENAME).is_file():
            self.weight_sparsity = json.loads((folder / STATE_FILENAME).read_text())["weight_sparsity"]
        if (folder / MASKS_FILENAME).is_file():
            self._restored_masks = load_masks(folder / MASKS_FILENAME)

    # --- logging ----------------------------------------------------------------------------------
    def target_weight_names(self, model: PreTrainedModel) -> list[str]:
        """Parameter names of the weights ``--prune_target_modules`` selects in ``model``."""
        return [f"{n}.weight" for n in target_linear_modules(model, self.pruning_args.prune_target_modules)]

    def sparsity_logs(self, model: PreTrainedModel) -> dict[str, float]:
        """Real zero fractions of the target weights: overall and per block."""
        counts = grouped_sparsity(model, weight_layer_groups(model, self.pruning_args.prune_target_modules))
        zeros, entries = sum(c[2] for c in counts.values()), sum(c[1] for c in counts.values())
        logs = {"prune/sparsity": zeros / entries}
        for group, (_, n, group_zeros) in counts.items():
            logs[f"prune/sparsity_{group.replace('.', '_')}"] = group_zeros / n
        return logs

    def _log(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]) -> None:
        if not state.is_world_process_zero:
            return
        state.log_history.append({**logs, "step": state.global_step})
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if "tensorboard" not in report_to and "all" not in report_to:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Beside the Trainer's own event files (which sit under output_dir/runs/<date_host>).
            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(log_dir, "pruning"))
        for key, value in logs.items():
            self._writer.add_scalar(key, value, state.global_step)
        if self.head_importance is not None and any(k.startswith("prune/heads") for k in logs):
            from .cards import head_importance_figure

            self._writer.add_figure(
                "prune/head_importance", head_importance_figure(self.head_importance), state.global_step
            )
        self._writer.flush()


def zero_pruned_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: dict) -> None:
    """Zero the optimizer state (e.g. Adam moments) of pruned entries, so momentum cannot revive them."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        state = inner.state.get(params[name])
        for value in (state or {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                value.mul_(mask.to(device=value.device, dtype=value.dtype))
