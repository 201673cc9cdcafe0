"""``GradientPruningCallback``: structural and weight pruning at chosen steps of a ``Trainer``."""

from __future__ import annotations

import functools
import itertools
import json
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

from ..core.adapters import HEADS, find_target_modules, get_adapter, weight_layer_groups
from ..core.batches import prepare_batch
from ..core.masks import (
    MASKS_FILENAME,
    apply_masks,
    get_masks,
    grouped_sparsity,
    load_masks,
    reapply_masks,
    save_masks,
)
from ..core.record import PruningRecord
from ..core.sharding import is_sharded, local_part
from ..io.checkpoint import fit_to_checkpoint
from ..structured.flops import flops_ratio, measure_speedup
from ..structured.rounds import prune_in_rounds, prune_layers_by_importance
from ..structured.surgery import prune_to_record
from ..weights.pruning import prune_weights
from .arguments import PruningArguments
from .distillation import frozen_copy
from .lora import is_peft_model, mask_lora_updates
from .planning import PruningPlan

logger = logging.getLogger(__name__)

STATE_FILENAME = "pruning_state.json"
PRUNING_METRICS = "prune/"
"""The prefix of every metric the pruning logs."""
#: Pruning arguments that may change between a checkpoint and its resumed run: they do not decide what is
#: pruned, only how well it is estimated or how much memory scoring takes (``--scoring_passes``: the same
#: masks in any number of passes).
HARMLESS_ON_RESUME = frozenset({"importance_batches", "measure_speedup", "scoring_passes"})


def fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version ``args`` ask for (``fsdp_config["fsdp_version"]``, default 1); ``None``: no FSDP."""
    config = args.fsdp_config or {}  # TrainingArguments strips the "fsdp_" of its keys
    return int(config.get("version", config.get("fsdp_version", 1))) if args.fsdp else None


def take_batches(dataloader: Iterable, count: int) -> list[Any]:
    """The first ``count`` batches of a fresh pass over ``dataloader``, leaving the training RNG untouched.

    An accelerate-prepared loader is read through its ``base_dataloader``, so the Trainer's own epoch
    iterator and accelerate's gradient-state bookkeeping are not disturbed.
    """
    loader = getattr(dataloader, "base_dataloader", dataloader)
    with torch.random.fork_rng(devices=[]):
        batches = list(itertools.islice(iter(loader), count))
    if len(batches) < count:
        warnings.warn(
            f"`--importance_batches` is {count} but the training data gives {len(batches)} batch(es) per "
            f"pass: importance is computed on those {len(batches)}.",
            stacklevel=2,
        )
    return batches


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
        self._writer = None
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
        logs.update(self.structure_logs(model))
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
        _tag_pruned(model)
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
        record = PruningRecord.from_config(getattr(model, "config", None))
        masked = len(get_masks(model))
        if record.is_empty() and not masked:
            return
        args = self.pruning_args
        found = [
            f"{name}: {sum(map(len, layers.values()))} removed" for name, layers in record.pruned.items()
        ]
        found += [f"{masked} masked weight tensors"] if masked else []
        message = (
            f"The model is already pruned ({', '.join(found)}). Head and FFN counts and fractions remove "
            "that many more; `--target_flops_ratio` counts from the original model; weight masks are "
            "recomputed at `--weight_sparsity` over all weights, the zeros included."
        )
        if args.prunes_by_flops and getattr(model, "config", None) is not None and not record.is_empty():
            now = flops_ratio(model, args.flops_seq_len)
            if now <= args.target_flops_ratio:
                message += f" Its FLOPs are already {now:.1%} of the original: no head or neuron will go."
        warnings.warn(message, stacklevel=3)

    def _warn_about_the_schedule(self, max_steps: int) -> None:
        """Prune steps and ramp ends at or past the end of training never happen: say so at train begin."""
        args = self.pruning_args
        steps = args.prune_step_list if args.prunes_structures or args.sparsity_schedule == "one_shot" else []
        late = [step for step in steps if step >= max_steps]
        if late and (args.prunes_structures or args.prunes_weights):
            warnings.warn(
                f"`--prune_steps` {late} are at or past the end of training (max_steps={max_steps}): those "
                "cuts never happen. Set steps below max_steps.",
                stacklevel=3,
            )
        if (
            args.prunes_weights
            and args.sparsity_schedule != "one_shot"
            and args.sparsity_schedule_end >= max_steps
        ):
            start, every = args.sparsity_schedule_start, args.sparsity_schedule_frequency
            last = start + (max_steps - 1 - start) // every * every  # the ramp's last update in training
            final = (self.plan.weight_sparsity_at(last) if last >= start else None) or 0.0
            warnings.warn(
                f"`--sparsity_schedule_end` {args.sparsity_schedule_end} is at or past the end of training "
                f"(max_steps={max_steps}): the weights end at sparsity {final:.3g}, not the "
                f"`--weight_sparsity` {args.weight_sparsity}. End the ramp before max_steps.",
                stacklevel=3,
            )

    def refuse_sharded_training(self, fsdp_version: int | None, deepspeed: bool) -> None:
        """What does not run sharded is refused with the reason: DeepSpeed, FSDP 1, and under FSDP2 what
        reads whole parameters or copies the model (``fsdp_version``: ``None`` without FSDP)."""
        if deepspeed:
            raise ValueError(
                "hf_gradprune does not support DeepSpeed training: its weight masks and gradient hooks, "
                "importance and head/neuron surgery work on whole parameters or on FSDP2's shards, which "
                "DeepSpeed partitions otherwise (the masks would not match the partitions). Train with FSDP2 "
                "(`--fsdp full_shard --fsdp_config '{\"fsdp_version\": 2}'`) or DDP. See docs/scaling.md."
            )
        if fsdp_version is None:
            return
        if fsdp_version != 2:
            raise ValueError(
                f"hf_gradprune supports FSDP2 only, got fsdp_version={fsdp_version}: FSDP 1 flattens the "
                "parameters that masks and importance address by name. Set `fsdp_config={'fsdp_version': 2}` "
                "(`--fsdp_config '{\"fsdp_version\": 2}'`). See docs/scaling.md."
            )
        args = self.pruning_args
        later = args.prunes_structures and any(step > 0 for step in args.prune_step_list)
        structures = f"heads, FFN neurons or layers after step 0 (`--prune_steps {args.prune_steps}`)"
        unsupported = [
            *(["--distill_alpha"] if args.distills else []),
            *args.layer_by_layer_flags,
            *([f"--scoring_passes {args.scoring_passes}"] if args.scoring_passes > 1 else []),
            *(["--export_vanilla"] if args.export_vanilla else []),
            *([structures] if later else []),
        ]
        if unsupported:
            raise ValueError(
                "Under FSDP2 hf_gradprune prunes weights in one shot (every `--weight_importance` but "
                "sparsegpt, every scope and N:M pattern) and cuts heads, FFN neurons and layers at step 0 "
                f"with PruningTrainer (before the model is sharded), not yet {', '.join(unsupported)}: they "
                "read whole parameters, change shapes after sharding or copy the model on every rank. Train "
                "with DDP, or prune in one process first and fine-tune the pruned model with its masks under "
                "FSDP2. See docs/scaling.md."
            )

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.refuse_sharded_training(fsdp_version(args), bool(args.deepspeed))
        if self.pruning_args.prunes_structures and is_peft_model(kwargs.get("model")):
            raise ValueError(
                "Heads, FFN neurons and layers are not cut under LoRA (`peft_config`): the adapters' "
                "matrices would have to be cut with their layers. Cut first (without `peft_config`, then "
                "save the smaller model), then train LoRA on it. Weight pruning (`--weight_sparsity`) works "
                "under LoRA: the base weights are masked and so is the LoRA update, so `merge_and_unload` "
                "keeps the zeros."
            )
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
            self._warn_about_the_schedule(state.max_steps)
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
                self._pending_logs.update(self.sparsity_logs(model))
            _tag_pruned(model)
            if cut or self.pruning_args.sparsity_schedule == "one_shot":
                self._around_cut("after")
        if self._pending_logs:
            self._write_figures(args, state, model)

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
        heads = self.head_importance
        state = {
            "weight_sparsity": self.weight_sparsity,
            "speedup": self.speedup,
            "pruning_args": self.pruning_args.to_dict(),
            "evaluations": self.evaluations,
            "head_importance": None if heads is None else heads.tolist(),
        }
        partial = folder / f".{STATE_FILENAME}.tmp"
        partial.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(partial, folder / STATE_FILENAME)

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
        if (folder / STATE_FILENAME).is_file():
            saved = json.loads((folder / STATE_FILENAME).read_text())
            self._check_resumed_args(saved.get("pruning_args", {}), folder)
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

    def _check_resumed_args(self, saved: dict[str, Any], folder: Path) -> None:
        current = self.pruning_args.to_dict()
        # A flag newer than the checkpoint was at its default then.
        saved = {**PruningArguments.defaults(), **saved}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        harmful = [k for k in changed if k not in HARMLESS_ON_RESUME]
        if harmful:
            details = "; ".join(f"`--{k}` {saved.get(k)!r} -> {current.get(k)!r}" for k in harmful)
            raise ValueError(
                f"Cannot resume from {folder.name!r} with other pruning arguments: {details}. They change "
                "what is pruned: resume with the checkpoint's arguments, or start a new run."
            )
        if changed:
            details = "; ".join(f"`--{k}` {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            warnings.warn(
                f"Resuming from {folder.name!r} with changed pruning arguments: {details}.", stacklevel=3
            )

    # --- logging ----------------------------------------------------------------------------------
    def target_weight_names(self, model: nn.Module) -> list[str]:
        """Parameter names of the weights ``--prune_target_modules`` selects in ``model``."""
        return [f"{n}.weight" for n in find_target_modules(model, self.pruning_args.prune_target_modules)]

    def sparsity_logs(self, model: nn.Module) -> dict[str, float]:
        """Real zero fractions of the target weights: overall and per block (per module without adapter)."""
        counts = grouped_sparsity(model, weight_layer_groups(model, self.pruning_args.prune_target_modules))
        zeros, entries = sum(c[2] for c in counts.values()), sum(c[1] for c in counts.values())
        logs = {"prune/sparsity": zeros / entries}
        for group, (_, n, group_zeros) in counts.items():
            logs[f"prune/sparsity_{group.replace('.', '_')}"] = group_zeros / n
        return logs

    def structure_logs(self, model: nn.Module) -> dict[str, float]:
        """Units of each structure left per layer, whole layers removed, and the block FLOPs left (at
        ``--flops_seq_len``)."""
        adapter = get_adapter(model)
        record = PruningRecord.from_config(model.config)
        logs = {}
        for structure in adapter.structures:
            num_units = adapter.num_units(structure, model.config)
            for layer in range(len(adapter.blocks(model))):
                kept = record.kept(structure.name, layer, num_units)
                logs[f"prune/{structure.name}_layer_{layer}"] = float(len(kept))
        if record.removed_layers:
            logs["prune/layers_removed"] = float(len(record.removed_layers))
        logs["prune/flops_ratio"] = flops_ratio(model, self.pruning_args.flops_seq_len)
        return logs

    def _write_figures(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """The head-importance heatmap and the FFN sizes as TensorBoard figures, when TensorBoard reports."""
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        wanted = "tensorboard" in report_to or "all" in report_to
        if (
            not wanted
            or not state.is_world_process_zero
            or not self._pending_logs.keys() & {"prune/flops_ratio"}
        ):
            return
        from ..io.figures import head_importance_figure, unit_sizes_figure

        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Beside the Trainer's own event files (which sit under output_dir/runs/<date_host>).
            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(log_dir, "pruning"))
        if self.head_importance is not None:
            self._writer.add_figure(
                "prune/head_importance", head_importance_figure(self.head_importance), state.global_step
            )
        for name, layers in PruningRecord.from_config(model.config).pruned.items():
            if any(layers.values()):
                self._writer.add_figure(
                    f"prune/{name}_sizes", unit_sizes_figure(model, name), state.global_step
                )
        self._writer.flush()


def _tag_pruned(model: nn.Module) -> None:
    """Tag a transformers model as pruned: ``Trainer.push_to_hub`` (trl's too) merges a model's tags into
    the card it writes, so a plain ``Trainer`` with the callback publishes a card that says so."""
    from ..io.cards import CARD_TAGS

    if callable(getattr(model, "add_model_tags", None)):
        model.add_model_tags(list(CARD_TAGS))


def zero_pruned_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: dict) -> None:
    """Zero the optimizer state (e.g. Adam moments) of pruned entries, so momentum cannot revive them."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        state = inner.state.get(params[name])
        for value in (state or {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                local = local_part(mask, value) if is_sharded(value) else mask  # FSDP2: the shard's part
                (value.to_local() if is_sharded(value) else value).mul_(local.to(value.device, value.dtype))
