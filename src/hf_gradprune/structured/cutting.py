"""Cutting parameters: keep chosen rows or columns of a layer, or the kept units of one structure in one
block, and carry an optimizer's state and the weight masks over to the new parameters.

What to cut, its checks and its record are :mod:`hf_gradprune.structured.surgery`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..core.adapters import GROUP, UNIT, ArchitectureAdapter, Structure, refresh_features, weight_dims


class Replacement(NamedTuple):
    """A parameter swapped by surgery: ``new == old.index_select(dim, keep)``."""

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    keep: torch.Tensor


def _replace(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> Replacement:
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return Replacement(old, new, dim, keep)


def cut_linear(module: nn.Module, keep: torch.Tensor, side: str) -> list[Replacement]:
    """Keep only the ``keep`` outputs (``side="out"``) or inputs (``side="in"``) of a layer, in place.

    Works on ``nn.Linear``, transformers' ``Conv1D`` and convolutions (output or input channels). The module
    object, its hooks, dtype, device and ``requires_grad`` stay; its parameters are new tensors.

    Returns:
        `list[Replacement]`: the swapped parameters, for :func:`remap_optimizer`.
    """
    out_dim, in_dim = weight_dims(module)
    keep = keep.to(module.weight.device)
    replaced = [_replace(module, "weight", out_dim if side == "out" else in_dim, keep)]
    if side == "out" and module.bias is not None:
        replaced.append(_replace(module, "bias", 0, keep))
    refresh_features(module)
    return replaced


def _rows(positions: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of the units at ``positions`` in a run of ``width``-wide units."""
    return torch.tensor([p * width + i for p in positions for i in range(width)], dtype=torch.long)


def cut_structure(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    structure: Structure,
    layer: int,
    before: list[int],
    after: list[int],
) -> list[Replacement]:
    """Cut the rows and columns of the units in ``before`` but not in ``after`` from one block."""
    width = adapter.unit_width(structure, model.config)
    group = adapter.group_size(structure, model.config)
    kept_groups_before = sorted({u // group for u in before})
    kept_groups_after = sorted({u // group for u in after})
    runs = {
        UNIT: (len(before) * width, _rows([before.index(u) for u in after], width)),
        GROUP: (
            len(kept_groups_before) * width,
            _rows([kept_groups_before.index(g) for g in kept_groups_after], width),
        ),
    }
    replaced: list[Replacement] = []
    for rows in structure.rows:
        offset, parts = 0, []
        for segment in rows.segments:
            length, keep = runs[segment]
            parts.append(keep + offset)
            offset += length
        replaced += cut_linear(adapter.module(model, layer, rows.path), torch.cat(parts), "out")
    replaced += cut_linear(adapter.module(model, layer, structure.output), runs[UNIT][1], "in")
    adapter.set_unit_count(model, layer, structure, len(after))
    return replaced


def remap_optimizer(optimizer: torch.optim.Optimizer, replacements: Sequence[Replacement]) -> None:
    """Point ``optimizer`` at the new parameters; state of kept rows is kept, state of removed rows dropped.

    Works in place on the optimizer (and on an accelerate ``AcceleratedOptimizer`` wrapping one), so a
    learning-rate scheduler holding it stays valid.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    swap = {id(r.old): r for r in replacements}
    for group in inner.param_groups:
        group["params"] = [swap[id(p)].new if id(p) in swap else p for p in group["params"]]
    for r in replacements:
        state = inner.state.pop(r.old, None)
        if state is not None:
            inner.state[r.new] = {
                k: v.index_select(r.dim, r.keep.to(v.device))
                if torch.is_tensor(v) and v.shape == r.old.shape
                else v
                for k, v in state.items()
            }


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> None:
    """Take ``params`` and their state out of ``optimizer`` (in place, as :func:`remap_optimizer`)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    gone = {id(p) for p in params}
    for group in inner.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for param in params:
        inner.state.pop(param, None)


def cut_masks(
    masks: dict[str, torch.Tensor], names: dict[int, str], replaced: Sequence[Replacement]
) -> dict[str, torch.Tensor]:
    """Weight masks with the rows/columns surgery removed from their parameters removed too."""
    cut = dict(masks)
    for r in replaced:
        name = names[id(r.old)]
        if name in cut:
            cut[name] = cut[name].index_select(r.dim, r.keep.to(cut[name].device))
    return cut
