"""Structural cuts without the Trainer: units removed in rounds each scored anew, a FLOPs budget, the
least important whole layers, and mask tuning at the end."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapters import get_adapter
from ..core.choices import (
    HEAD_ACCUMULATIONS,
    MASK_TUNING_METHODS,
    check_choice,
)
from .flops import check_flops_target, flops_in_rounds, neuron_multiples
from .importance import compute_layer_importance, compute_unit_importance
from .least_squares_tuning import capture_targets, rescale_units
from .mask_tuning import capture_teacher, distill_unit_scales
from .surgery import prune_layers, remove_chosen

#: What mask tuning keeps of the unpruned model, and what fits the scales to it, by method.
MASK_TUNERS = {
    "distillation": (capture_teacher, distill_unit_scales),
    "least_squares": (capture_targets, rescale_units),
}


def prune_in_rounds(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    structures: Sequence[str],
    choose: Callable[[dict[str, torch.Tensor], int], Mapping[str, Mapping[int, Sequence[int]]]],
    rounds: int = 1,
    mask_tuning: bool = False,
    accumulate: str = "fisher",
    optimizer: torch.optim.Optimizer | None = None,
    mask_tuning_method: str = "distillation",
    allow_empty: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Remove units in ``rounds`` rounds, each scored on the model the rounds before it left.

    Every round scores ``structures`` on ``batches`` (:func:`hf_gradprune.compute_unit_importance`) and
    removes what ``choose(importance, round_index)`` returns (under ``"layers"``, whole layers, numbered as
    the model stands: :func:`hf_gradprune.prune_layers`). Scores of a model that lost units are different
    from the original's: units that seemed spare may carry what the removed ones did, so a cut made in steps
    keeps more than one made at once (``benchmarks/structured_speed.py``). With ``mask_tuning`` the kept
    units are rescaled once at the end against the original model's outputs: all together by distillation
    (:func:`hf_gradprune.distill_unit_scales`, the default) or block by block by least squares
    (:func:`hf_gradprune.rescale_units`).

    Args:
        model (`nn.Module`): a model of a registered family that returns a loss on ``batches``.
        batches (`Sequence[Mapping]`): calibration batches.
        structures (`Sequence[str]`): the structures to score (``"heads"``, ``"ffn"``, ``"layers"``).
        choose (`Callable`): the units to remove this round, from the scores and the round's index.
        rounds (`int`, *optional*, defaults to 1): scoring rounds.
        mask_tuning (`bool`, *optional*, defaults to `False`): rescale the kept units at the end.
        accumulate (`str`, *optional*, defaults to `"fisher"`): see
            :func:`hf_gradprune.compute_unit_importance`.
        optimizer (`torch.optim.Optimizer`, *optional*): remapped in place, see
            :func:`hf_gradprune.prune_units`.
        mask_tuning_method (`str`, *optional*, defaults to `"distillation"`): ``"distillation"`` or
            ``"least_squares"``.
        allow_empty (`bool`, *optional*, defaults to `False`): let a layer lose every unit of a structure.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict[str, Any]`: ``units`` (all removed, by structure and layer as numbered in their round),
        ``layers`` (whole layers removed, in the original numbering), ``importance`` (the last scores) and the
        mask-tuning report.
    """
    check_choice("accumulate", accumulate, HEAD_ACCUMULATIONS)
    if rounds < 1:
        raise ValueError(f"`rounds` must be a positive number of rounds, got {rounds}.")
    check_choice("mask_tuning_method", mask_tuning_method, MASK_TUNING_METHODS)
    adapter = get_adapter(model)
    renumbering = [name for name in structures if adapter.structure(name).spans_layers]
    if mask_tuning and mask_tuning_method == "least_squares" and renumbering:
        raise ValueError(
            "`mask_tuning_method='least_squares'` fits each layer's outputs to the same layer of the model "
            f"before the cut, which whole layers removed would renumber: use 'distillation' with "
            f"{renumbering[0]!r}."
        )
    batches = list(batches)
    capture, tune = MASK_TUNERS[mask_tuning_method]
    targets = capture(model, batches, show_progress) if mask_tuning else None
    removed: dict[str, dict[int, list[int]]] = {}
    removed_layers: list[int] = []
    importance: dict[str, torch.Tensor] = {}
    for index in range(rounds):
        importance = compute_unit_importance(
            model, batches, structures, accumulate=accumulate, show_progress=show_progress
        )
        units, layers = remove_chosen(model, choose(importance, index), optimizer, allow_empty)
        for name, chosen_layers in units.items():
            for layer, chosen in chosen_layers.items():
                removed.setdefault(name, {}).setdefault(layer, []).extend(chosen)
        removed_layers.extend(layers)
    cut = removed or removed_layers
    report = tune(model, batches, targets, show_progress=show_progress) if mask_tuning and cut else {}
    return {"units": removed, "layers": sorted(removed_layers), "importance": importance, **report}


def prune_to_flops(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    target_ratio: float,
    seq_len: int = 128,
    rounds: int = 8,
    mask_tuning: bool = False,
    accumulate: str = "fisher",
    min_heads_per_layer: int = 1,
    allow_empty: bool = False,
    ffn_multiple_of: int | None = None,
    uniform: bool = False,
    mask_tuning_method: str = "distillation",
    show_progress: bool = True,
    layers: bool = False,
) -> dict[str, Any]:
    """Remove heads and FFN neurons until the block FLOPs fall to ``target_ratio``, without retraining.

    Heads and neurons are scored by the Fisher information of their gates on ``batches``, ranked together by
    importance per FLOP and removed, in ``rounds`` equal steps of FLOPs each scored anew on the model the
    steps before left (:func:`prune_in_rounds`); ``mask_tuning`` then rescales the kept ones so the model
    reproduces the original (Kwon et al., 2022), by distillation or block by block by least squares.

    Args:
        model (`nn.Module`): a model of a registered family that returns a loss on ``batches``.
        batches (`Sequence[Mapping]`): calibration batches with labels (a causal LM may omit them).
        target_ratio (`float`): fraction in (0, 1) of the original block FLOPs to keep.
        seq_len (`int`, *optional*, defaults to 128): the sequence length FLOPs are counted at.
        rounds (`int`, *optional*, defaults to 8): scoring rounds.
        mask_tuning (`bool`, *optional*, defaults to `False`): rescale the kept units at the end.
        accumulate (`str`, *optional*, defaults to `"fisher"`): how gate gradients become scores, see
            :func:`hf_gradprune.compute_unit_importance`.
        min_heads_per_layer (`int`, *optional*, defaults to 1): heads (key/value groups) every layer keeps.
        allow_empty (`bool`, *optional*, defaults to `False`): let a layer lose every head or neuron.
        ffn_multiple_of (`int`, *optional*): FFN neurons leave each layer in blocks of this many
            (default: 64 when the FFN width is a multiple of 64, else 1; see
            :func:`hf_gradprune.structured.flops.neuron_multiples`).
        uniform (`bool`, *optional*, defaults to `False`): remove as many heads and as many neurons from
            every layer, so that :func:`hf_gradprune.export_vanilla` can write an ordinary config.
        mask_tuning_method (`str`, *optional*, defaults to `"distillation"`): see :func:`prune_in_rounds`.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.
        layers (`bool`, *optional*, defaults to `False`): rank whole layers too (the Fisher information of
            a gate on each block's residual branch), each costing its FLOPs as it stands.

    Returns:
        `dict[str, Any]`: ``units`` (what was removed, by structure and layer), ``layers`` (whole layers
        removed, original numbering), ``importance`` and the mask-tuning report.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import block_flops
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99)).eval()
        >>> batch = {"input_ids": torch.randint(1, 99, (4, 16)), "labels": torch.tensor([0, 1, 0, 1])}
        >>> dense = block_flops(model, 16)
        >>> _ = prune_to_flops(model, [batch], 0.5, seq_len=16, rounds=2, show_progress=False)
        >>> 0.4 < block_flops(model, 16) / dense <= 0.5  # a tiny model: a head is a big step
        True
    """
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"`target_ratio` must be in (0, 1), got {target_ratio}.")
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int):
        raise TypeError(f"`min_heads_per_layer` must be an int, got {min_heads_per_layer!r}.")
    if min_heads_per_layer < (0 if allow_empty else 1):
        raise ValueError(
            f"`min_heads_per_layer` must be >= 1 (>= 0 with `allow_empty=True`), got {min_heads_per_layer}."
        )
    adapter = get_adapter(model)
    names = [structure.name for structure in adapter.structures]
    minimum = {name: 0 if allow_empty else 1 for name in names}
    minimum["heads"] = 0 if allow_empty else min_heads_per_layer
    multiples = neuron_multiples(model, ffn_multiple_of)
    ranked = [*names, adapter.whole_layers.name] if layers else names
    check_flops_target(model, target_ratio, seq_len, minimum, multiples, uniform, ranked)
    return prune_in_rounds(
        model,
        batches,
        ranked,
        flops_in_rounds(model, target_ratio, seq_len, minimum, rounds, multiples, uniform),
        rounds=rounds,
        mask_tuning=mask_tuning,
        accumulate=accumulate,
        allow_empty=allow_empty,
        mask_tuning_method=mask_tuning_method,
        show_progress=show_progress,
    )


def prune_layers_by_importance(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    num_layers: int,
    method: str = "fisher",
    optimizer: torch.optim.Optimizer | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Remove the ``num_layers`` least important whole layers (:func:`hf_gradprune.compute_layer_importance`
    on ``batches``, then :func:`hf_gradprune.prune_layers`).

    Args:
        model (`nn.Module`): a model of a registered family (that returns a loss for ``"fisher"``).
        batches (`Sequence[Mapping]`): calibration batches.
        num_layers (`int`): layers to remove, fewer than the model has.
        method (`str`, *optional*, defaults to `"fisher"`): ``"fisher"`` or ``"block_influence"``.
        optimizer (`torch.optim.Optimizer`, *optional*): the removed layers' parameters leave it.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict[str, Any]`: ``layers`` (the positions removed, numbered as the model stood) and ``importance``
        (the scores of every layer it had).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}
        >>> report = prune_layers_by_importance(model, [batch], 1, show_progress=False)
        >>> model.config.num_hidden_layers, len(report["layers"])
        (2, 1)
    """
    depth = len(get_adapter(model).blocks(model))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 0 <= num_layers < depth:
        raise ValueError(
            f"`num_layers` must be an int in [0, {depth - 1}] ({depth} layers), got {num_layers!r}."
        )
    importance = compute_layer_importance(model, batches, method, show_progress=show_progress)
    layers = sorted(importance.argsort(stable=True)[:num_layers].tolist())
    if layers:
        prune_layers(model, layers, optimizer=optimizer)
    return {"layers": layers, "importance": importance}
