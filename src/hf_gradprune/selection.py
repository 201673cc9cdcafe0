"""Selection: importance scores to the heads to remove."""

from __future__ import annotations

import math

import torch


def _unit_scores(importance: torch.Tensor, num_key_value_heads: int | None) -> tuple[torch.Tensor, int]:
    """Scores per prunable unit and the unit size: heads, or whole key/value groups under GQA.

    A unit whose heads are all NaN (already removed) scores NaN.
    """
    num_heads = importance.shape[1]
    kv = num_key_value_heads or num_heads
    if kv < 1 or num_heads % kv:
        raise ValueError(
            f"`num_key_value_heads` must divide the {num_heads} query heads, got {num_key_value_heads}."
        )
    group = num_heads // kv
    grouped = importance.reshape(importance.shape[0], kv, group)
    gone = grouped.isnan().all(dim=-1)
    scores = torch.nan_to_num(grouped, nan=0.0).sum(dim=-1)
    return scores.masked_fill(gone, float("nan")), group


def select_heads_to_prune(
    importance: torch.Tensor,
    per_layer: int | None = None,
    fraction: float | None = None,
    min_heads_per_layer: int = 1,
    num_key_value_heads: int | None = None,
) -> dict[int, list[int]]:
    """The least important heads to remove, in original head indices.

    Heads already removed (NaN importance) are neither counted nor chosen. For grouped-query models
    (``num_key_value_heads`` below the number of query heads) the unit is a whole key/value group,
    ranked by the summed importance of its query heads, and ``per_layer`` and ``min_heads_per_layer``
    count groups.

    Args:
        importance (`torch.Tensor`): ``(num_layers, num_heads)`` scores, higher is more important.
        per_layer (`int`, *optional*): remove this many units from every layer.
        fraction (`float`, *optional*): remove this fraction in [0, 1) of the remaining units,
            ranked across all layers (scores should be normalised per layer).
        min_heads_per_layer (`int`, *optional*, defaults to 1): units every layer keeps.
        num_key_value_heads (`int`, *optional*): key/value heads per layer of the original model.

    Returns:
        `dict[int, list[int]]`: layer index to sorted query heads to remove (layers with none omitted).

    Example:
        >>> import torch
        >>> select_heads_to_prune(torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]), per_layer=1)
        {0: [0], 1: [0]}
        >>> select_heads_to_prune(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), per_layer=1, num_key_value_heads=2)
        {0: [0, 1]}
    """
    if importance.dim() != 2:
        raise ValueError(f"`importance` must be 2-D (layers, heads), got shape {tuple(importance.shape)}.")
    if (per_layer is None) == (fraction is None):
        raise ValueError(
            "Give exactly one of `per_layer` and `fraction`, got "
            f"per_layer={per_layer} and fraction={fraction}."
        )
    if min_heads_per_layer < 1:
        raise ValueError(f"`min_heads_per_layer` must be at least 1, got {min_heads_per_layer}.")
    scores, group = _unit_scores(importance.detach().float().cpu(), num_key_value_heads)
    remaining = (~scores.isnan()).sum(dim=-1)
    if per_layer is not None:
        chosen = _per_layer(scores, remaining, per_layer, min_heads_per_layer, group)
    else:
        chosen = _global(scores, remaining, fraction, min_heads_per_layer)
    return {
        layer: sorted(h for unit in units for h in range(unit * group, (unit + 1) * group))
        for layer, units in sorted(chosen.items())
        if units
    }


def _per_layer(
    scores: torch.Tensor, remaining: torch.Tensor, per_layer: int, minimum: int, group: int
) -> dict[int, list[int]]:
    unit = "key/value groups" if group > 1 else "heads"
    allowed = int(remaining.min()) - minimum
    if not 0 <= per_layer <= allowed:
        raise ValueError(
            f"`per_layer` must be in [0, {max(allowed, 0)}] ({int(remaining.min())} {unit} left in the "
            f"smallest layer, {minimum} kept by `min_heads_per_layer`), got {per_layer}."
        )
    order = torch.nan_to_num(scores, nan=math.inf).argsort(dim=-1, stable=True)
    return {layer: order[layer, :per_layer].tolist() for layer in range(scores.shape[0])}


def _global(
    scores: torch.Tensor, remaining: torch.Tensor, fraction: float, minimum: int
) -> dict[int, list[int]]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction}.")
    budget = int(fraction * int(remaining.sum()))
    flat = torch.nan_to_num(scores, nan=math.inf).flatten().argsort(stable=True)
    left = remaining.clone()
    chosen: dict[int, list[int]] = {}
    for index in flat.tolist():
        if budget == 0:
            break
        layer, unit = divmod(index, scores.shape[1])
        if math.isnan(scores[layer, unit]) or left[layer] <= minimum:
            continue
        chosen.setdefault(layer, []).append(unit)
        left[layer] -= 1
        budget -= 1
    return chosen
