"""Selection of units: importance scores to the heads, neurons and whole layers to remove, by count, fraction
or cost budget."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence

import torch


def _unit_scores(importance: torch.Tensor, group: int) -> torch.Tensor:
    """Scores per prunable unit: single units, or whole groups of ``group`` (key/value groups under GQA).

    A unit whose members are all NaN (already removed) scores NaN.
    """
    num_units = importance.shape[1]
    if group < 1 or num_units % group:
        raise ValueError(f"`group` must divide the {num_units} units per layer, got {group}.")
    grouped = importance.reshape(importance.shape[0], num_units // group, group)
    gone = grouped.isnan().all(dim=-1)
    scores = torch.nan_to_num(grouped, nan=0.0).sum(dim=-1)
    return scores.masked_fill(gone, float("nan"))


def _expand(chosen: dict[int, list[int]], group: int) -> dict[int, list[int]]:
    """Group indices to sorted member indices, layers with none left out."""
    return {
        layer: sorted(u for g in groups for u in range(g * group, (g + 1) * group))
        for layer, groups in sorted(chosen.items())
        if groups
    }


def select_units_to_prune(
    importance: torch.Tensor,
    per_layer: int | None = None,
    fraction: float | None = None,
    min_units_per_layer: int = 1,
    group: int = 1,
    unit_name: str = "units",
) -> dict[int, list[int]]:
    """The least important units of one structure to remove, in original unit indices.

    Units already removed (NaN importance) are neither counted nor chosen. With ``group > 1`` (attention
    heads under grouped-query attention) the prunable unit is a whole group of ``group`` consecutive units,
    ranked by the sum of their scores, and ``per_layer`` and ``min_units_per_layer`` count groups.

    Args:
        importance (`torch.Tensor`): ``(num_layers, num_units)`` scores, higher is more important.
        per_layer (`int`, *optional*): remove this many units (groups) from every layer.
        fraction (`float`, *optional*): remove this fraction in [0, 1) of the remaining units (groups),
            ranked across all layers (scores should be comparable across layers).
        min_units_per_layer (`int`, *optional*, defaults to 1): units (groups) every layer keeps; 0 lets a
            layer lose them all.
        group (`int`, *optional*, defaults to 1): units that leave together.
        unit_name (`str`, *optional*, defaults to `"units"`): what the units are called in errors.

    Returns:
        `dict[int, list[int]]`: layer index to sorted units to remove (layers with none omitted).

    Example:
        >>> import torch
        >>> select_units_to_prune(torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]), per_layer=1)
        {0: [0], 1: [0]}
        >>> select_units_to_prune(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), per_layer=1, group=2)
        {0: [0, 1]}
    """
    if importance.dim() != 2:
        raise ValueError(f"`importance` must be 2-D (layers, units), got shape {tuple(importance.shape)}.")
    if (per_layer is None) == (fraction is None):
        raise ValueError(
            "Give exactly one of `per_layer` and `fraction`, got "
            f"per_layer={per_layer} and fraction={fraction}."
        )
    if min_units_per_layer < 0:
        raise ValueError(f"`min_units_per_layer` must be >= 0, got {min_units_per_layer}.")
    scores = _unit_scores(importance.detach().float().cpu(), group)
    remaining = (~scores.isnan()).sum(dim=-1)
    if per_layer is not None:
        chosen = _per_layer(scores, remaining, per_layer, min_units_per_layer, unit_name)
    else:
        chosen = _global(scores, remaining, fraction, min_units_per_layer)
    return _expand(chosen, group)


def select_heads_to_prune(
    importance: torch.Tensor,
    per_layer: int | None = None,
    fraction: float | None = None,
    min_heads_per_layer: int = 1,
    num_key_value_heads: int | None = None,
) -> dict[int, list[int]]:
    """The least important heads to remove, in original head indices: :func:`select_units_to_prune` on heads.

    For grouped-query models (``num_key_value_heads`` below the number of query heads) the unit is a whole
    key/value group, ranked by the summed importance of its query heads, and ``per_layer`` and
    ``min_heads_per_layer`` count groups.

    Args:
        importance (`torch.Tensor`): ``(num_layers, num_heads)`` scores, higher is more important.
        per_layer (`int`, *optional*): remove this many units from every layer.
        fraction (`float`, *optional*): remove this fraction in [0, 1) of the remaining units,
            ranked across all layers (scores should be normalised per layer).
        min_heads_per_layer (`int`, *optional*, defaults to 1): units every layer keeps (0: a layer may
            lose them all).
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
    if min_heads_per_layer < 0:
        raise ValueError(
            f"`min_heads_per_layer` must be >= 0 (0 lets a layer lose every head), got {min_heads_per_layer}."
        )
    num_heads = importance.shape[-1]
    kv = num_key_value_heads or num_heads
    if kv < 1 or num_heads % kv:
        raise ValueError(
            f"`num_key_value_heads` must divide the {num_heads} query heads, got {num_key_value_heads}."
        )
    group = num_heads // kv
    return select_units_to_prune(
        importance,
        per_layer=per_layer,
        fraction=fraction,
        min_units_per_layer=min_heads_per_layer,
        group=group,
        unit_name="key/value groups" if group > 1 else "heads",
    )


def _per_layer(
    scores: torch.Tensor, remaining: torch.Tensor, per_layer: int, minimum: int, unit_name: str
) -> dict[int, list[int]]:
    allowed = int(remaining.min()) - minimum
    if not 0 <= per_layer <= allowed:
        raise ValueError(
            f"`per_layer` must be in [0, {max(allowed, 0)}] ({int(remaining.min())} {unit_name} left in the "
            f"smallest layer, {minimum} kept by the minimum per layer), got {per_layer}."
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


def select_units_under_budget(
    importance: Mapping[str, torch.Tensor],
    costs: Mapping[str, float | Sequence[float]],
    remove_cost: float,
    groups: Mapping[str, int] | None = None,
    min_units_per_layer: int | Mapping[str, int] = 1,
    multiple_of: Mapping[str, int] | None = None,
    uniform: bool = False,
    layer_budget: float | None = None,
) -> dict[str, dict[int, list[int]]]:
    """Units of several structures ranked together by importance per cost, removed until ``remove_cost``.

    The prunable units (groups of ``groups[name]`` units) of every structure are sorted by
    ``score / cost`` and removed, cheapest loss per saved multiply-add first, until the removed cost
    reaches ``remove_cost``; a unit that would overshoot is passed over while cheaper units (neurons) can
    close the gap, so the target is met within one cheapest unit. A layer keeps at least
    ``min_units_per_layer`` of each structure. Scores must be on one scale across structures, such as the
    Fisher information of their gates. With ``multiple_of[name] = m`` a layer's units of that structure
    leave in blocks of its ``m`` lowest-scored ones (ranked by their mean score per cost), so every layer
    keeps a multiple of ``m``: sizes that dense kernels run at full speed. With ``uniform`` every layer loses
    as many units of a structure: the ``j``-th lowest-scored units of all layers leave together, ranked by
    their summed score, so the result is an ordinary config of the family (see
    :func:`hf_gradprune.export_vanilla`).

    A structure whose units are whole layers (one score per layer, and a cost per layer: what each layer
    costs now) joins the ranking too: a layer is one candidate, and choosing it takes back the units already
    chosen in it (its cost counts once); at least one layer stays. A layer may overshoot ``remove_cost`` up
    to ``layer_budget`` (the whole cut's cost when this is one round of it: later rounds then remove less),
    since no cheaper unit can stand in for it.

    Args:
        importance (`Mapping[str, torch.Tensor]`): structure name to ``(num_layers, num_units)`` scores,
            NaN for units already removed; a structure of whole layers to ``(num_layers,)`` scores.
        costs (`Mapping[str, float | Sequence[float]]`): structure name to the cost (e.g. multiply-adds) of
            one prunable unit (a whole group); for a structure of whole layers, the cost of each layer.
        remove_cost (`float`): the cost to remove, >= 0.
        groups (`Mapping[str, int]`, *optional*): structure name to units that leave together (default 1).
        min_units_per_layer (`int` or `Mapping[str, int]`, *optional*, defaults to 1): groups of each
            structure every layer keeps (one number for all, or per structure name).
        multiple_of (`Mapping[str, int]`, *optional*): structure name to the block size its units leave in
            (default 1); a layer whose count is not a multiple first loses the remainder.
        uniform (`bool`, *optional*, defaults to `False`): remove the same number from every layer (each
            layer its own lowest-scored units); every layer must have as many left.
        layer_budget (`float`, *optional*): the removed cost a whole layer may take it to (default
            ``remove_cost``).

    Returns:
        `dict[str, dict[int, list[int]]]`: structure name to layer index to sorted units to remove
        (``"layers"``: each removed layer to ``[layer]``).

    Raises:
        ValueError: the cost cannot be reached while every layer keeps its minimum.

    Example:
        >>> import torch
        >>> scores = {"heads": torch.tensor([[4.0, 1.0]]), "ffn": torch.tensor([[0.2, 0.5, 0.1, 3.0]])}
        >>> select_units_under_budget(scores, {"heads": 10.0, "ffn": 1.0}, remove_cost=12)
        {'heads': {0: [1]}, 'ffn': {0: [0, 2]}}
        >>> select_units_under_budget(scores, {"heads": 10.0, "ffn": 1.0}, 2, multiple_of={"ffn": 2})
        {'heads': {}, 'ffn': {0: [0, 2]}}
    """
    if remove_cost < 0:
        raise ValueError(f"`remove_cost` must be >= 0, got {remove_cost}.")
    groups = groups or {}
    minimum = (
        dict(min_units_per_layer)
        if isinstance(min_units_per_layer, Mapping)
        else dict.fromkeys(importance, min_units_per_layer)
    )
    importance = dict(importance)
    spanning = [name for name, score in importance.items() if score.dim() == 1]
    if len(spanning) > 1:
        raise ValueError(f"One structure of whole layers can join a budget, got {spanning}.")
    layers = spanning[0] if spanning else None
    whole = importance.pop(layers) if layers else None
    layer_costs = costs.get(layers) if layers else None
    if whole is not None and (
        uniform or isinstance(layer_costs, numbers.Real) or len(layer_costs or ()) != whole.numel()
    ):
        raise ValueError(
            f"Whole layers ({layers!r}) join a budget with one cost per layer ({whole.numel()} of them) and "
            f"without `uniform`, got costs[{layers!r}]={layer_costs!r} and uniform={uniform}."
        )
    if uniform:
        return _uniform_under_budget(importance, costs, remove_cost, groups, minimum, multiple_of)
    # (score per cost, structure, layer, units, cost): a layer's units leave in blocks.
    candidates: list[tuple[float, str, int, list[int], float]] = []
    left: dict[tuple[str, int], int] = {}
    for layer, (value, cost) in enumerate(zip(_layer_scores(whole, layers), layer_costs or (), strict=False)):
        if cost <= 0:
            raise ValueError(f"`costs[{layers!r}][{layer}]` must be positive, got {cost}.")
        candidates.append((value / cost, layers, layer, [layer], float(cost)))
    for name, score in importance.items():
        unit_scores = _unit_scores(score.detach().float().cpu(), groups.get(name, 1))
        cost = float(costs[name])
        if cost <= 0:
            raise ValueError(f"`costs[{name!r}]` must be positive, got {cost}.")
        block = (multiple_of or {}).get(name, 1)
        if block < 1:
            raise ValueError(f"`multiple_of[{name!r}]` must be >= 1, got {block}.")
        for layer, row in enumerate(unit_scores.tolist()):
            present = sorted((v, unit) for unit, v in enumerate(row) if not math.isnan(v))
            left[name, layer] = len(present)
            # Blocks from the lowest scores up, the remainder first: their means rise, so a layer's blocks
            # go in order.
            bounds = [0, *range(len(present) % block or block, len(present) + 1, block)]
            for low, high in itertools.pairwise(bounds):
                units = present[low:high]
                mean = sum(v for v, _ in units) / len(units)
                candidates.append((mean / cost, name, layer, [u for _, u in units], cost * len(units)))
    candidates.sort(key=lambda c: c[0])
    chosen: dict[str, dict[int, list[int]]] = {name: {} for name in importance}
    gone: dict[int, list[int]] = {}
    spent = [0.0] * (0 if whole is None else whole.numel())  # cost of the units chosen in each layer
    removed = 0.0
    cheapest = min((c[4] for c in candidates), default=0.0)
    # First pass: lowest score per cost first, but a block that would overshoot the target is passed over
    # while cheaper ones can still close the gap; the second pass takes the cheapest passed-over blocks.
    passed_over: list[tuple[float, str, int, list[int], float]] = []
    for pass_over in (True, False):
        for candidate in candidates if pass_over else sorted(passed_over, key=lambda c: c[4]):
            _, name, layer, units, cost = candidate
            if removed >= remove_cost:
                break
            if layer in gone:
                continue
            if name == layers:
                cost -= spent[layer]  # its units already chosen were counted
                if len(gone) + 1 >= len(spent) or cost <= 0:
                    continue
            elif left[name, layer] - len(units) < minimum.get(name, 1):
                continue
            limit = remove_cost if name != layers or layer_budget is None else max(layer_budget, remove_cost)
            if pass_over and cost > cheapest and removed + cost > limit:
                passed_over.append(candidate)
                continue
            removed += cost
            if name == layers:
                gone[layer] = units
                for structure in chosen.values():
                    structure.pop(layer, None)
                continue
            chosen[name].setdefault(layer, []).extend(units)
            left[name, layer] -= len(units)
            if spent:
                spent[layer] += cost
    if removed < remove_cost:
        raise ValueError(
            f"Cannot remove {remove_cost:,.0f} of cost: only {removed:,.0f} can go while every layer keeps "
            f"{minimum} unit(s) of each structure; lower the target or allow empty layers."
        )
    result = {name: _expand(layers, groups.get(name, 1)) for name, layers in chosen.items()}
    return result if layers is None else {**result, layers: dict(sorted(gone.items()))}


def _layer_scores(layers: torch.Tensor | None, name: str | None) -> list[float]:
    """Per-layer scores as floats (none without layers); a non-finite input is refused."""
    if layers is None:
        return []
    if not torch.isfinite(layers).all():
        raise ValueError(f"`importance[{name!r}]` must be finite, one score per layer, got {layers!r}.")
    return layers.detach().float().cpu().tolist()


def _uniform_under_budget(
    importance: Mapping[str, torch.Tensor],
    costs: Mapping[str, float],
    remove_cost: float,
    groups: Mapping[str, int],
    minimum: Mapping[str, int],
    multiple_of: Mapping[str, int] | None,
) -> dict[str, dict[int, list[int]]]:
    """:func:`select_units_under_budget` with the same count from every layer: one pseudo-layer whose unit
    ``j`` is the ``j``-th lowest-scored unit (group) of every layer, scored by their sum and costing all."""
    slices, orders = {}, {}
    for name, score in importance.items():
        unit_scores = _unit_scores(score.detach().float().cpu(), groups.get(name, 1))
        left = (~unit_scores.isnan()).sum(dim=1)
        if left.unique().numel() > 1:
            raise ValueError(
                f"`uniform=True` removes as many {name!r} units from every layer, but the layers have "
                f"{left.tolist()} left: start from a model pruned the same in every layer."
            )
        order = torch.argsort(unit_scores.nan_to_num(float("inf")), dim=1, stable=True)[:, : int(left[0])]
        slices[name] = unit_scores.gather(1, order).sum(dim=0, keepdim=True)
        orders[name] = order
    num_layers = {order.shape[0] for order in orders.values()}.pop() if orders else 0
    chosen = select_units_under_budget(
        slices,
        {name: float(costs[name]) * num_layers for name in importance},
        remove_cost,
        min_units_per_layer=minimum,
        multiple_of=multiple_of,
    )
    return {
        name: _expand(
            {layer: orders[name][layer, layers[0]].tolist() for layer in range(num_layers)} if layers else {},
            groups.get(name, 1),
        )
        for name, layers in chosen.items()
    }
