"""Mask tuning (Kwon et al., 2022): after a structural cut, one scale per kept unit, folded into the weight
columns of its structure's output layer (the attention output projection, the FFN down projection), so the
pruned model reproduces the original with no new parameter.

:func:`distill_unit_scales` fits every kept unit's scale at once, by gradient descent on the KL divergence
between the pruned and the unpruned model's outputs (:func:`capture_teacher`), stopped when the divergence on
held-out calibration batches stops falling. Kwon et al.'s fit, block by block by least squares
(:mod:`hf_gradprune.structured.least_squares_tuning`), cannot see what matters to the model's output: on a
fine-tuned MiniLM it adds about 2 points to a one-shot cut and takes 1 point from a cut made in rounds
(``benchmarks/structured_speed.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import get_adapter, weight_dims
from ..core.batches import all_reduce_mean, frozen_for_probe, prepare_batch
from ..core.record import PruningRecord
from .importance import gate_probe

#: Outputs wider than this (a language model's vocabulary) are distilled on the teacher's most likely
#: entries and one bin for the rest, so the teacher's outputs take ``TOP_K + 1`` numbers a token.
TOP_K = 64


def fold_unit_scales(module: nn.Module, scales: torch.Tensor, width: int) -> None:
    """Multiply each unit's input columns of ``module`` by its scale, in place (dtype kept)."""
    in_dim = weight_dims(module)[1]
    per_column = scales.repeat_interleave(width).to(module.weight.dtype)
    shape = [1, 1]
    shape[in_dim] = -1
    with torch.no_grad():
        module.weight.mul_(per_column.view(shape))


@dataclass(frozen=True)
class Teacher:
    """The unpruned model's outputs on the calibration batches, as :func:`distill_unit_scales` needs them.

    ``log_probs[i]`` holds batch ``i``'s log-probabilities, one row per example (per real token for a
    sequence of outputs); rows wider than :data:`TOP_K` keep their ``TOP_K`` largest entries (``indices[i]``)
    and the log of the rest's mass. For one output (regression) they are the raw outputs.
    """

    log_probs: list[torch.Tensor]
    indices: list[torch.Tensor | None]


def _output_rows(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's ``logits`` on ``batch`` as float32 rows: one per example, or per real token."""
    inputs = prepare_batch(model, {k: v for k, v in batch.items() if k != "labels"})
    outputs = model(**inputs)
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "`mask_tuning_method='distillation'` needs a model that returns `logits` (got "
            f"{type(outputs).__name__}); use `mask_tuning_method='least_squares'`."
        )
    mask = inputs.get("attention_mask")
    if logits.dim() == 3 and isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]:
        return logits[mask.bool()].float()
    return logits.reshape(-1, logits.shape[-1]).float()


def coarse(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log_probs`` at ``indices`` with a last column for the log of the remaining mass."""
    top = log_probs.gather(-1, indices)
    top_mass = top.logsumexp(-1, keepdim=True).clamp_max(-1e-7)  # log of the top entries' mass, below 0
    return torch.cat([top, torch.log(-torch.expm1(top_mass))], dim=-1)


def capture_teacher(
    model: nn.Module, batches: list[Mapping[str, Any]], show_progress: bool = True
) -> Teacher:
    """Run the model (before its cut) and keep its outputs on ``batches`` for :func:`distill_unit_scales`.

    Args:
        model (`nn.Module`): the model before pruning; it must return ``logits``.
        batches (`list[Mapping]`): the calibration batches (given again to :func:`distill_unit_scales`).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `Teacher`: the outputs, at most ``TOP_K + 1`` numbers per row.
    """
    log_probs, indices = [], []
    with frozen_for_probe(model), torch.no_grad():
        for batch in tqdm(batches, desc="Mask tuning: original outputs", disable=not show_progress):
            rows = _output_rows(model, batch)
            chosen = None
            if rows.shape[-1] > 1:
                rows = rows.log_softmax(-1)
                if rows.shape[-1] > TOP_K + 1:
                    chosen = rows.topk(TOP_K, dim=-1).indices
                    rows = coarse(rows, chosen)
            log_probs.append(rows)
            indices.append(chosen)
    return Teacher(log_probs, indices)


def _divergence(model: nn.Module, batch: Mapping[str, Any], teacher: Teacher, index: int) -> torch.Tensor:
    """Mean KL divergence of the model's outputs on ``batch`` from the teacher's (squared error for one
    output)."""
    rows, wanted, chosen = _output_rows(model, batch), teacher.log_probs[index], teacher.indices[index]
    if rows.shape[-1] == 1:
        return (rows - wanted).square().mean()
    rows = rows.log_softmax(-1)
    if chosen is not None:
        rows = coarse(rows, chosen)
    return (wanted.exp() * (wanted - rows)).sum(-1).mean()


def distill_unit_scales(
    model: nn.Module,
    batches: list[Mapping[str, Any]],
    teacher: Teacher,
    structures: Iterable[str] | None = None,
    learning_rate: float = 1e-2,
    max_epochs: int = 10,
    patience: int = 2,
    show_progress: bool = True,
) -> dict[str, float]:
    """Fit one scale per kept unit by distillation from the unpruned model, and fold it into the weights.

    The scales start at 1 and are the gates of :class:`hf_gradprune.UnitGates`: Adam (``learning_rate``)
    lowers the KL divergence between the pruned model's outputs and the teacher's on the first three
    quarters of ``batches``, epoch after epoch, and the scales of the epoch with the lowest divergence on
    the last quarter are kept (a single batch is used for both). Stops after ``patience`` epochs without
    improvement or after ``max_epochs``. Only the scales change, so the model cannot drift far from the
    original; under ``torch.distributed`` gradients and divergences are averaged, so every rank folds the
    same scales.

    Args:
        model (`nn.Module`): the pruned model.
        batches (`list[Mapping]`): the batches :func:`capture_teacher` ran on, in the same order.
        teacher (`Teacher`): what :func:`capture_teacher` returned for the unpruned model.
        structures (`Iterable[str]`, *optional*): the structures to rescale (default: all).
        learning_rate (`float`, *optional*, defaults to 1e-2): Adam's step size.
        max_epochs (`int`, *optional*, defaults to 10): passes over the fitting batches at most.
        patience (`int`, *optional*, defaults to 2): epochs without a better held-out divergence before
            stopping.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over epochs.

    Returns:
        `dict[str, float]`: ``prune/mask_tuning_divergence_before`` and ``_after`` (held out),
        ``prune/mask_tuning_epochs`` (the epoch kept, 0 when none helped) and
        ``prune/mask_tuning_mean_scale``.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import prune_units
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99)).eval()
        >>> batches = [{"input_ids": torch.randint(1, 99, (8, 12))} for _ in range(4)]
        >>> teacher = capture_teacher(model, batches, show_progress=False)
        >>> _ = prune_units(model, {"heads": {0: [0, 1]}, "ffn": {1: list(range(20))}})
        >>> report = distill_unit_scales(model, batches, teacher, show_progress=False)
        >>> report["prune/mask_tuning_divergence_after"] <= report["prune/mask_tuning_divergence_before"]
        True
    """
    if len(teacher.log_probs) != len(batches):
        raise ValueError(
            f"`teacher` holds outputs of {len(teacher.log_probs)} batches, `batches` has {len(batches)}: "
            "give the batches `capture_teacher` ran on."
        )
    adapter = get_adapter(model)
    names = list(structures) if structures is not None else [s.name for s in adapter.structures]
    held = max(1, len(batches) // 4) if len(batches) > 1 else 0
    fitting = list(range(len(batches) - held))
    held_out = list(range(len(batches) - held, len(batches))) if held else fitting
    with gate_probe(model, names) as gates:
        scales = [g.gates for g in gates]
        optimizer = torch.optim.Adam(scales, lr=learning_rate)

        def held_out_divergence() -> float:
            with torch.no_grad():
                total = torch.stack([_divergence(model, batches[i], teacher, i) for i in held_out]).sum()
            return float(all_reduce_mean(total.double())) / len(held_out)

        before = best = held_out_divergence()
        kept, best_epoch = [s.detach().clone() for s in scales], 0
        for epoch in tqdm(range(1, max_epochs + 1), desc="Mask tuning", disable=not show_progress):
            for index in fitting:
                optimizer.zero_grad()
                _divergence(model, batches[index], teacher, index).backward()
                for scale in scales:
                    if scale.grad is not None:  # None on every rank alike: a structure with no unit left
                        all_reduce_mean(scale.grad)
                optimizer.step()
            divergence = held_out_divergence()
            if divergence < best:
                best, best_epoch, kept = divergence, epoch, [s.detach().clone() for s in scales]
            elif epoch - best_epoch >= patience:
                break
    record = PruningRecord.from_config(model.config)
    chosen = []
    for gate, values in zip(gates, kept, strict=True):
        width = adapter.unit_width(gate.structure, model.config)
        for layer in range(values.shape[0]):
            units = record.kept(gate.structure.name, layer, values.shape[1])
            if units:
                layer_scales = values[layer, units]
                fold_unit_scales(adapter.module(model, layer, gate.structure.output), layer_scales, width)
                chosen.append(layer_scales)
    return {
        "prune/mask_tuning_divergence_before": before,
        "prune/mask_tuning_divergence_after": best,
        "prune/mask_tuning_epochs": float(best_epoch),
        "prune/mask_tuning_mean_scale": float(torch.cat(chosen).mean()) if chosen else 1.0,
    }
