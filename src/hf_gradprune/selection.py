"""Selection: importance scores to the heads to remove or to weight masks, and sparsity schedules."""

from __future__ import annotations

import itertools
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .adapters.base import LAYERS
from .arguments import SPARSITY_SCHEDULES, SPARSITY_SCOPES, check_choice


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
    costs: Mapping[str, float],
    remove_cost: float,
    groups: Mapping[str, int] | None = None,
    min_units_per_layer: int | Mapping[str, int] = 1,
    multiple_of: Mapping[str, int] | None = None,
    uniform: bool = False,
    layer_costs: Sequence[float] | None = None,
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

    Whole layers join the ranking when ``importance`` has ``"layers"`` (one score per layer) and
    ``layer_costs`` says what each layer costs now: a layer is one candidate, and choosing it takes back the
    units already chosen in it (its cost counts once); at least one layer stays. A layer may overshoot
    ``remove_cost`` up to ``layer_budget`` (the whole cut's cost when this is one round of it: later rounds
    then remove less), since no cheaper unit can stand in for it.

    Args:
        importance (`Mapping[str, torch.Tensor]`): structure name to ``(num_layers, num_units)`` scores,
            NaN for units already removed; ``"layers"`` to ``(num_layers,)`` scores.
        costs (`Mapping[str, float]`): structure name to the cost (e.g. multiply-adds) of one prunable unit
            (a whole group).
        remove_cost (`float`): the cost to remove, >= 0.
        groups (`Mapping[str, int]`, *optional*): structure name to units that leave together (default 1).
        min_units_per_layer (`int` or `Mapping[str, int]`, *optional*, defaults to 1): groups of each
            structure every layer keeps (one number for all, or per structure name).
        multiple_of (`Mapping[str, int]`, *optional*): structure name to the block size its units leave in
            (default 1); a layer whose count is not a multiple first loses the remainder.
        uniform (`bool`, *optional*, defaults to `False`): remove the same number from every layer (each
            layer its own lowest-scored units); every layer must have as many left.
        layer_costs (`Sequence[float]`, *optional*): the cost of each whole layer, needed with ``"layers"``.
        layer_budget (`float`, *optional*): the removed cost a layer may take it to (default
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
    whole = importance.pop(LAYERS, None)
    if whole is not None and (uniform or layer_costs is None or len(layer_costs) != whole.numel()):
        raise ValueError(
            "Whole layers join a budget with one cost per layer (`layer_costs`, "
            f"{whole.numel()} of them) and without `uniform`, got layer_costs={layer_costs!r} and "
            f"uniform={uniform}."
        )
    if uniform:
        return _uniform_under_budget(importance, costs, remove_cost, groups, minimum, multiple_of)
    # (score per cost, structure, layer, units, cost): a layer's units leave in blocks.
    candidates: list[tuple[float, str, int, list[int], float]] = []
    left: dict[tuple[str, int], int] = {}
    for layer, (value, cost) in enumerate(zip(_layer_scores(whole), layer_costs or (), strict=False)):
        if cost <= 0:
            raise ValueError(f"`layer_costs[{layer}]` must be positive, got {cost}.")
        candidates.append((value / cost, LAYERS, layer, [layer], float(cost)))
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
            if name == LAYERS:
                cost -= spent[layer]  # its units already chosen were counted
                if len(gone) + 1 >= len(spent) or cost <= 0:
                    continue
            elif left[name, layer] - len(units) < minimum.get(name, 1):
                continue
            limit = remove_cost if name != LAYERS or layer_budget is None else max(layer_budget, remove_cost)
            if pass_over and cost > cheapest and removed + cost > limit:
                passed_over.append(candidate)
                continue
            removed += cost
            if name == LAYERS:
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
    return result if whole is None else {**result, LAYERS: dict(sorted(gone.items()))}


def _layer_scores(layers: torch.Tensor | None) -> list[float]:
    """Per-layer scores as floats (none without layers); a 2-D or non-finite input is refused."""
    if layers is None:
        return []
    if layers.dim() != 1 or not torch.isfinite(layers).all():
        raise ValueError(f"`importance['layers']` must be finite, one score per layer, got {layers!r}.")
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


def parse_sparsity_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for ``"unstructured"``, ``(N, M)`` for ``"N:M"`` (keep N of every M consecutive inputs).

    Args:
        pattern (`str`): ``"unstructured"`` or ``"N:M"`` with ``0 < N < M``, e.g. ``"2:4"``.

    Example:
        >>> parse_sparsity_pattern("2:4")
        (2, 4)
        >>> parse_sparsity_pattern("unstructured") is None
        True
    """
    if not isinstance(pattern, str):
        raise TypeError(f"`sparsity_pattern` must be a string, got {type(pattern).__name__}.")
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    n, m = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 0 < n < m:
        raise ValueError(
            "`sparsity_pattern` must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), "
            f"got {pattern!r}."
        )
    return n, m


def _comparable(score: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``score`` in which NaN ranks above everything (NaN is never pruned first)."""
    score = score.detach().float()
    return score.masked_fill(score.isnan(), math.inf)


def _lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` smallest entries of 1-D ``flat``; among ties the earlier entries first.

    ``kthvalue`` finds the threshold in linear time on any size (``torch.quantile`` stops at 2**24 entries).
    """
    if count == 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    threshold = flat.kthvalue(count).values
    lowest = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    lowest[ties[: count - int(lowest.sum())]] = True
    return lowest


def _buckets(
    scores: Mapping[str, torch.Tensor], scope: str, groups: Mapping[str, str] | None
) -> list[list[str]]:
    """The score names that share one threshold under ``scope``."""
    if scope == "per_tensor":
        return [[name] for name in scores]
    if scope == "global":
        return [list(scores)] if scores else []
    if groups is None:
        raise ValueError(
            "`groups` is required with scope='per_layer': map every score name to its layer key, "
            "e.g. with `hf_gradprune.adapters.weight_layer_groups(model)`."
        )
    missing = [name for name in scores if name not in groups]
    if missing:
        raise ValueError(
            f"`groups` has no layer key for {missing[:3]} ({len(missing)} in all): "
            "map every score name to its layer key."
        )
    buckets: dict[str, list[str]] = {}
    for name in scores:
        buckets.setdefault(groups[name], []).append(name)
    return list(buckets.values())


def _unstructured_masks(
    scores: Mapping[str, torch.Tensor], names: list[str], sparsity: float
) -> dict[str, torch.Tensor]:
    """Keep-masks of ``names`` pruning ``round(sparsity * n)`` of their ``n`` entries together."""
    device = scores[names[0]].device
    flat = torch.cat([_comparable(scores[name]).flatten().to(device) for name in names])
    parts = _lowest(flat, round(sparsity * flat.numel())).split([scores[name].numel() for name in names])
    return {
        name: part.logical_not().view(scores[name].shape).to(scores[name].device)
        for name, part in zip(names, parts, strict=True)
    }


def _input_axes(name: str, score: torch.Tensor, dims: int | Sequence[int]) -> list[int]:
    """``dims`` (one dimension or several) as sorted non-negative dimensions of ``score``."""
    axes = [dims] if isinstance(dims, int) else list(dims)
    if not axes or any(not -score.dim() <= d < score.dim() for d in axes):
        raise ValueError(
            f"`input_dims[{name!r}]` must be dimensions of its {score.dim()}-D score, got {dims}."
        )
    return sorted({d % score.dim() for d in axes})


def _as_rows(score: torch.Tensor, axes: list[int]) -> tuple[torch.Tensor, torch.Size]:
    """``score`` as ``(rows, inputs)`` (the input ``axes`` last, flattened in order), and the moved shape."""
    moved = score.movedim(axes, list(range(score.dim() - len(axes), score.dim())))
    return moved.reshape(-1, math.prod(moved.shape[score.dim() - len(axes) :])), moved.shape


def _from_rows(keep: torch.Tensor, moved_shape: torch.Size, axes: list[int]) -> torch.Tensor:
    ndim = len(moved_shape)
    return keep.view(moved_shape).movedim(list(range(ndim - len(axes), ndim)), axes).contiguous()


def _n_m_mask(
    name: str, score: torch.Tensor, n: int, m: int, dims: int | Sequence[int], pattern: str
) -> torch.Tensor:
    """Keep-mask with the ``n`` largest of every ``m`` consecutive inputs of each output row."""
    axes = _input_axes(name, score, dims)
    rows, moved_shape = _as_rows(_comparable(score), axes)
    if rows.shape[1] % m:
        raise ValueError(
            f"`{name}` has {rows.shape[1]} inputs per output (dims {tuple(axes)}), not a multiple of M={m} "
            f"of sparsity pattern {pattern!r}: leave it out of the scores or prune it 'unstructured'."
        )
    groups = rows.reshape(-1, m)
    pruned = groups.argsort(dim=1, stable=True)[:, : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, pruned, False)
    return _from_rows(keep.view(rows.shape), moved_shape, axes)


def _per_row_mask(name: str, score: torch.Tensor, sparsity: float, dims: int | Sequence[int]) -> torch.Tensor:
    """Keep-mask pruning ``round(sparsity * inputs)`` of every output row (lowest first, ties by position)."""
    axes = _input_axes(name, score, dims)
    rows, moved_shape = _as_rows(_comparable(score), axes)
    pruned = rows.argsort(dim=1, stable=True)[:, : round(sparsity * rows.shape[1])]
    keep = torch.ones_like(rows, dtype=torch.bool).scatter_(1, pruned, False)
    return _from_rows(keep, moved_shape, axes)


def compute_weight_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None,
    scope: str = "per_tensor",
    pattern: str = "unstructured",
    groups: Mapping[str, str] | None = None,
    input_dims: Mapping[str, int | Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` keeps) that prune the lowest-scoring weights.

    Unstructured, exactly ``round(sparsity * n)`` entries are pruned out of the ``n`` entries that share a
    threshold: each tensor (``"per_tensor"``), each output row (``"per_row"``: the inputs of one output
    feature or convolution channel, as Wanda compares), each layer as given by ``groups`` (``"per_layer"``)
    or all tensors together (``"global"``). Ties are broken by position (the earlier entry of the flattened
    tensors, in ``scores`` order, is pruned first) and NaN scores rank highest, so the count is exact and
    the result deterministic. ``per_layer`` and ``global`` concatenate the scores of a group on the device
    of its first tensor. An N:M pattern keeps the N highest of every M consecutive inputs of each output
    row; ``scope`` and ``groups`` play no part then and ``sparsity`` is ``1 - N/M``.

    Args:
        scores (`Mapping[str, torch.Tensor]`): parameter name to scores of the weight's shape, higher is more
            important, as from :func:`hf_gradprune.importance.compute_weight_importance`.
        sparsity (`float`, *optional*): fraction in [0, 1) to prune; with an N:M pattern ``None`` or
            ``1 - N/M``.
        scope (`str`, *optional*, defaults to `"per_tensor"`): one of ``SPARSITY_SCOPES``.
        pattern (`str`, *optional*, defaults to `"unstructured"`): ``"unstructured"`` or ``"N:M"``.
        groups (`Mapping[str, str]`, *optional*): parameter name to layer key (e.g. ``"layer.3"``), required
            by ``scope="per_layer"``; :func:`hf_gradprune.adapters.weight_layer_groups` gives it.
        input_dims (`Mapping[str, int | Sequence[int]]`, *optional*): parameter name to the dimension(s)
            holding one output's inputs, for ``per_row`` and N:M; names not given use the last dimension,
            right for ``nn.Linear`` (out, in) but not for GPT-2's ``Conv1D`` (in, out, so ``0``) or a
            convolution (out, in, *kernel, so ``(1, 2, 3)``): :func:`hf_gradprune.adapters.weight_input_dims`
            gives them all.

    Returns:
        `dict[str, torch.Tensor]`: parameter name to a bool mask of its score's shape and device, in
        ``scores`` order.

    Raises:
        ValueError: a value out of range, ``per_layer`` without complete ``groups``, or inputs per output
            that are not a multiple of M.
        TypeError: a score that is not a tensor, or an unstructured ``sparsity`` that is not a number.

    Example:
        >>> import torch
        >>> scores = {"w": torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.0, 5.0, 6.0, 7.0]])}
        >>> compute_weight_masks(scores, 0.25)["w"].int().tolist()
        [[1, 0, 1, 1], [0, 1, 1, 1]]
        >>> compute_weight_masks(scores, 0.5, scope="per_row")["w"].int().tolist()
        [[1, 0, 1, 0], [0, 0, 1, 1]]
        >>> compute_weight_masks(scores, None, pattern="2:4")["w"].int().tolist()
        [[1, 0, 1, 0], [0, 0, 1, 1]]
    """
    check_choice("scope", scope, SPARSITY_SCOPES)
    n_m = parse_sparsity_pattern(pattern)
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"`scores[{name!r}]` must be a torch.Tensor, got {type(score).__name__}.")
    ignored = [
        arg
        for arg, unused in (
            ("`scope`", n_m is not None and scope != "per_tensor"),
            ("`groups`", groups is not None and (n_m is not None or scope != "per_layer")),
            ("`input_dims`", input_dims is not None and n_m is None and scope != "per_row"),
        )
        if unused
    ]
    if ignored:
        warnings.warn(
            f"{' and '.join(ignored)} ignored with pattern={pattern!r} and scope={scope!r}.", stacklevel=2
        )
    dims = input_dims or {}
    if n_m is not None:
        n, m = n_m
        if sparsity is not None and not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(
                f"`sparsity` must be None or {1 - n / m:g} (1 - {n}/{m}) with sparsity pattern {pattern!r}, "
                f"got {sparsity}."
            )
        return {name: _n_m_mask(name, s, n, m, dims.get(name, -1), pattern) for name, s in scores.items()}
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"`sparsity` must be a float in [0, 1) when unstructured, got {sparsity!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    if scope == "per_row":
        return {name: _per_row_mask(name, s, sparsity, dims.get(name, -1)) for name, s in scores.items()}
    masks: dict[str, torch.Tensor] = {}
    for names in _buckets(scores, scope, groups):
        masks.update(_unstructured_masks(scores, names, sparsity))
    return {name: masks[name] for name in scores}


def masks_keeping(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None,
    existing: Mapping[str, torch.Tensor],
    scope: str = "per_tensor",
    pattern: str = "unstructured",
    groups: Mapping[str, str] | None = None,
    input_dims: Mapping[str, int | Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`compute_weight_masks` where the weights ``existing`` masks prune already score lowest, so they
    stay pruned; ``groups`` and ``input_dims`` reach it only where ``scope`` and ``pattern`` read them."""
    scores = dict(scores)
    for name, mask in existing.items():
        if name in scores:
            scores[name] = scores[name].masked_fill(~mask.to(scores[name].device), float("-inf"))
    layout: dict[str, Any] = {}
    if scope == "per_layer" and pattern == "unstructured":
        layout["groups"] = groups
    if scope == "per_row" or pattern != "unstructured":
        layout["input_dims"] = input_dims
    return compute_weight_masks(scores, sparsity, scope=scope, pattern=pattern, **layout)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float = 5.0) -> float:
    """The fraction of entries of ``scores`` (a layer's, taken together) above ``threshold`` times their
    mean: OWL's layer-wise outlier distribution (LOD) of Wanda scores."""
    flat = torch.cat([score.detach().flatten().float() for score in scores])
    return float((flat > threshold * flat.mean()).double().mean())


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, spread: float = 0.08) -> list[float]:
    """OWL's sparsity per layer (Yin et al., 2024): the layer with the most outliers keeps most, the kept
    fractions spread linearly in the outlier ratio over a range of ``2 * spread`` around ``1 - sparsity``,
    so their mean is ``1 - sparsity`` (the total, for layers of one size). The spread shrinks where it would
    take a layer out of ``[0, 1)``.

    Example:
        >>> [round(s, 2) for s in owl_sparsities([0.01, 0.02, 0.03], 0.5)]
        [0.58, 0.5, 0.42]
    """
    ratios = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    spread = min(spread, sparsity, 0.999 - sparsity)
    span = ratios.max() - ratios.min()
    density = (ratios - ratios.min()) / span * 2 * spread if span > 0 else torch.zeros_like(ratios)
    return (sparsity + density.mean() - density).tolist()


def sparsity_at_step(
    step: int,
    target: float,
    start_step: int,
    end_step: int,
    schedule: str = "one_shot",
    frequency: int = 1,
) -> float:
    """The sparsity to reach at optimizer step ``step`` under a pruning schedule.

    - ``"one_shot"``: 0 before ``start_step``, ``target`` from it on (``end_step`` plays no part).
    - ``"linear"``: from 0 at ``start_step`` to ``target`` at ``end_step`` in equal increments.
    - ``"cubic"``: Zhu & Gupta (2017), ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))**3`` with
      ``s_i = 0`` and ``s_f = target``: fast at first, slow near the end.

    Ramps move only every ``frequency`` steps counted from ``start_step`` and hold their value in
    between; from ``end_step`` on the sparsity is ``target``.

    Args:
        step (`int`): the current step, >= 0.
        target (`float`): the final sparsity in [0, 1).
        start_step (`int`): the first pruning step, >= 0.
        end_step (`int`): the step where ramps reach ``target``, >= ``start_step``.
        schedule (`str`, *optional*, defaults to `"one_shot"`): one of ``SPARSITY_SCHEDULES``.
        frequency (`int`, *optional*, defaults to 1): steps between two updates of a ramp, >= 1.

    Example:
        >>> sparsity_at_step(50, 0.8, start_step=0, end_step=100, schedule="linear")
        0.4
        >>> round(sparsity_at_step(50, 0.8, start_step=0, end_step=100, schedule="cubic"), 6)
        0.7
        >>> sparsity_at_step(55, 0.8, start_step=0, end_step=100, schedule="linear", frequency=10)
        0.4
    """
    check_choice("schedule", schedule, SPARSITY_SCHEDULES)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"`target` must be in [0, 1), got {target}.")
    if step < 0 or start_step < 0:
        raise ValueError(
            f"`step` and `start_step` must be >= 0, got step={step} and start_step={start_step}."
        )
    if end_step < start_step:
        raise ValueError(f"`end_step` must be >= `start_step` ({start_step}), got {end_step}.")
    if frequency < 1:
        raise ValueError(f"`frequency` must be a positive number of steps, got {frequency}.")
    if step < start_step:
        return 0.0
    if schedule == "one_shot" or step >= end_step:
        return float(target)
    updated = step - (step - start_step) % frequency
    progress = (updated - start_step) / (end_step - start_step)
    if schedule == "linear":
        return target * progress
    return target * (1.0 - (1.0 - progress) ** 3)
