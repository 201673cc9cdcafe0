"""What a pruning run reports: the metrics it logs (real zero fractions, units left per layer, FLOPs left),
the TensorBoard figures of the head scores and the structures' sizes, and the tags that mark a model
pruned."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import TrainerState, TrainingArguments

from ..core.adapters import find_target_modules, get_adapter, weight_layer_groups
from ..core.masks import grouped_sparsity
from ..core.record import PruningRecord
from ..structured.flops import flops_ratio

PRUNING_METRICS = "prune/"
"""The prefix of every metric the pruning logs."""


def target_weight_names(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Parameter names of the weights ``--prune_target_modules`` selects in ``model``."""
    return [f"{n}.weight" for n in find_target_modules(model, target_modules)]


def sparsity_logs(model: nn.Module, target_modules: list[str] | None) -> dict[str, float]:
    """Real zero fractions of the target weights: overall and per block (per module without adapter)."""
    counts = grouped_sparsity(model, weight_layer_groups(model, target_modules))
    zeros, entries = sum(c[2] for c in counts.values()), sum(c[1] for c in counts.values())
    logs = {"prune/sparsity": zeros / entries}
    for group, (_, n, group_zeros) in counts.items():
        logs[f"prune/sparsity_{group.replace('.', '_')}"] = group_zeros / n
    return logs


def structure_logs(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Units of each structure left per layer, whole layers removed, and the block FLOPs left (at
    ``seq_len`` tokens)."""
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
    logs["prune/flops_ratio"] = flops_ratio(model, seq_len)
    return logs


def tag_pruned(model: nn.Module) -> None:
    """Tag a transformers model as pruned: ``Trainer.push_to_hub`` (trl's too) merges a model's tags into
    the card it writes, so a plain ``Trainer`` with the callback publishes a card that says so."""
    from ..io.cards import CARD_TAGS  # here: the cards load matplotlib, which a callback may never need

    if callable(getattr(model, "add_model_tags", None)):
        model.add_model_tags(list(CARD_TAGS))


class TensorBoardFigures:
    """The head-importance heatmap and the sizes of each cut structure as TensorBoard figures, beside the
    ``Trainer``'s own event files, when the run reports to TensorBoard."""

    def __init__(self) -> None:
        self._writer = None

    def write(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: nn.Module,
        head_importance: torch.Tensor | None,
    ) -> None:
        """Add the figures of ``model`` at ``state.global_step`` (on the first process, with TensorBoard)."""
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if not ("tensorboard" in report_to or "all" in report_to) or not state.is_world_process_zero:
            return
        # Here, not at import: matplotlib is only loaded by a run that draws figures.
        from ..io.figures import head_importance_figure, unit_sizes_figure

        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Beside the Trainer's own event files (which sit under output_dir/runs/<date_host>).
            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(log_dir, "pruning"))
        if head_importance is not None:
            self._writer.add_figure(
                "prune/head_importance", head_importance_figure(head_importance), state.global_step
            )
        for name, layers in PruningRecord.from_config(model.config).pruned.items():
            if any(layers.values()):
                self._writer.add_figure(
                    f"prune/{name}_sizes", unit_sizes_figure(model, name), state.global_step
                )
        self._writer.flush()

    def close(self) -> None:
        """Close the event file, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
