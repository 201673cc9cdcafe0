"""One-shot structured pruning outside the ``Trainer``: score, cut to a FLOPs budget, rescale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .arguments import HEAD_ACCUMULATIONS, check_choice
from .flops import select_units_for_flops
from .importance import compute_unit_importance
from .rescale import capture_targets, rescale_units
from .surgery import prune_units


def prune_and_rescale(
    model: nn.Module,
    units_to_prune: Mapping[str, Mapping[int, Sequence[int]]],
    batches: Sequence[Mapping[str, Any]],
    mask_tuning: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    allow_empty: bool = False,
    show_progress: bool = True,
) -> dict[str, float]:
    """:func:`hf_gradprune.prune_units`, then (``mask_tuning``) the kept units rescaled on ``batches`` so each
    block reproduces the unpruned one (:func:`hf_gradprune.rescale_units`). Returns the tuning report."""
    if not any(units_to_prune.values()):
        return {}
    targets = capture_targets(model, list(batches), show_progress) if mask_tuning else None
    prune_units(model, units_to_prune, optimizer=optimizer, allow_empty=allow_empty)
    if targets is None:
        return {}
    return rescale_units(model, list(batches), targets, show_progress=show_progress)


def prune_to_flops(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    target_ratio: float,
    seq_len: int = 128,
    mask_tuning: bool = True,
    accumulate: str = "fisher",
    min_heads_per_layer: int = 1,
    allow_empty: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Remove heads and FFN neurons until the block FLOPs fall to ``target_ratio``, without retraining.

    Heads and neurons are scored by the Fisher information of their gates on ``batches``, ranked together by
    importance per FLOP, removed, and (``mask_tuning``) the kept ones rescaled layer by layer by least
    squares so every block reproduces the original: the retraining-free recipe of Kwon et al. (2022).

    Args:
        model (`nn.Module`): a model of a registered family that returns a loss on ``batches``.
        batches (`Sequence[Mapping]`): calibration batches with labels (a causal LM may omit them).
        target_ratio (`float`): fraction in (0, 1) of the original block FLOPs to keep.
        seq_len (`int`, *optional*, defaults to 128): the sequence length FLOPs are counted at.
        mask_tuning (`bool`, *optional*, defaults to `True`): rescale the kept units.
        accumulate (`str`, *optional*, defaults to `"fisher"`): how gate gradients become scores, see
            :func:`hf_gradprune.compute_unit_importance`.
        min_heads_per_layer (`int`, *optional*, defaults to 1): heads (key/value groups) every layer keeps.
        allow_empty (`bool`, *optional*, defaults to `False`): let a layer lose every head or neuron.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `dict[str, Any]`: ``units`` (what was removed, by structure and layer) and the mask-tuning report.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import block_flops
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99)).eval()
        >>> batch = {"input_ids": torch.randint(1, 99, (4, 16)), "labels": torch.tensor([0, 1, 0, 1])}
        >>> dense = block_flops(model, 16)
        >>> _ = prune_to_flops(model, [batch], 0.5, seq_len=16, show_progress=False)
        >>> 0.45 < block_flops(model, 16) / dense <= 0.5
        True
    """
    check_choice("accumulate", accumulate, HEAD_ACCUMULATIONS)
    adapter = get_adapter(model)
    names = [structure.name for structure in adapter.structures]
    importance = compute_unit_importance(
        model, batches, names, accumulate=accumulate, show_progress=show_progress
    )
    minimum = {name: 0 if allow_empty else 1 for name in names}
    minimum["heads"] = 0 if allow_empty else min_heads_per_layer
    units = select_units_for_flops(model, importance, target_ratio, seq_len, minimum)
    report = prune_and_rescale(
        model, units, batches, mask_tuning=mask_tuning, allow_empty=allow_empty, show_progress=show_progress
    )
    return {"units": units, "importance": importance, **report}
