"""Selection: importance scores to the heads to remove or to weight masks, and sparsity schedules."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping

import torch

from .arguments import SPARSITY_SCHEDULES, SPARSITY_SCOPES, check_choice


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
            "e.g. with `hf_gradprune.importance.weight_layer_groups(model)`."
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


def _n_m_mask(name: str, score: torch.Tensor, n: int, m: int, dim: int, pattern: str) -> torch.Tensor:
    """Keep-mask with the ``n`` largest of every ``m`` consecutive entries along ``dim``."""
    if not -score.dim() <= dim < score.dim():
        raise ValueError(
            f"`input_dims[{name!r}]` must be a dimension of its {score.dim()}-D score, got {dim}."
        )
    dim %= score.dim()
    moved = _comparable(score).movedim(dim, -1)
    if moved.shape[-1] % m:
        raise ValueError(
            f"`{name}` has {moved.shape[-1]} inputs (dim {dim}), not a multiple of M={m} of sparsity pattern "
            f"{pattern!r}: leave it out of the scores or prune it 'unstructured'."
        )
    groups = moved.reshape(-1, m)
    pruned = groups.argsort(dim=1, stable=True)[:, : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, pruned, False)
    return keep.view(moved.shape).movedim(-1, dim).contiguous()


def compute_weight_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | None,
    scope: str = "per_tensor",
    pattern: str = "unstructured",
    groups: Mapping[str, str] | None = None,
    input_dims: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` keeps) that prune the lowest-scoring weights.

    Unstructured, exactly ``round(sparsity * n)`` entries are pruned out of the ``n`` entries that share a
    threshold: each tensor (``"per_tensor"``), each layer as given by ``groups`` (``"per_layer"``) or all
    tensors together (``"global"``). Ties are broken by position (the earlier entry of the flattened
    tensors, in ``scores`` order, is pruned first) and NaN scores rank highest, so the count is exact and
    the result deterministic. ``per_layer`` and ``global`` concatenate the scores of a group on the device
    of its first tensor. An N:M pattern keeps the N highest of every M consecutive entries along each
    weight's input dimension; ``scope`` and ``groups`` play no part then and ``sparsity`` is ``1 - N/M``.

    Args:
        scores (`Mapping[str, torch.Tensor]`): parameter name to scores of the weight's shape, higher is more
            important, as from :func:`hf_gradprune.importance.compute_weight_importance`.
        sparsity (`float`, *optional*): fraction in [0, 1) to prune; with an N:M pattern ``None`` or
            ``1 - N/M``.
        scope (`str`, *optional*, defaults to `"per_tensor"`): one of ``SPARSITY_SCOPES``.
        pattern (`str`, *optional*, defaults to `"unstructured"`): ``"unstructured"`` or ``"N:M"``.
        groups (`Mapping[str, str]`, *optional*): parameter name to layer key (e.g. ``"layer.3"``), required
            by ``scope="per_layer"``; :func:`hf_gradprune.importance.weight_layer_groups` gives it.
        input_dims (`Mapping[str, int]`, *optional*): parameter name to its input dimension for N:M patterns;
            names not given use the last dimension, right for ``nn.Linear`` (out, in) but not for GPT-2's
            ``Conv1D`` (in, out): :func:`hf_gradprune.importance.weight_input_dims` gives them all.

    Returns:
        `dict[str, torch.Tensor]`: parameter name to a bool mask of its score's shape and device, in
        ``scores`` order.

    Raises:
        ValueError: a value out of range, ``per_layer`` without complete ``groups``, or an input dimension
            that is not a multiple of M.
        TypeError: a score that is not a tensor, or an unstructured ``sparsity`` that is not a number.

    Example:
        >>> import torch
        >>> scores = {"w": torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.0, 5.0, 6.0, 7.0]])}
        >>> compute_weight_masks(scores, 0.25)["w"].int().tolist()
        [[1, 0, 1, 1], [0, 1, 1, 1]]
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
            ("`input_dims`", input_dims is not None and n_m is None),
        )
        if unused
    ]
    if ignored:
        warnings.warn(
            f"{' and '.join(ignored)} ignored with pattern={pattern!r} and scope={scope!r}.", stacklevel=2
        )
    if n_m is not None:
        n, m = n_m
        if sparsity is not None and not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(
                f"`sparsity` must be None or {1 - n / m:g} (1 - {n}/{m}) with sparsity pattern {pattern!r}, "
                f"got {sparsity}."
            )
        dims = input_dims or {}
        return {name: _n_m_mask(name, s, n, m, dims.get(name, -1), pattern) for name, s in scores.items()}
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"`sparsity` must be a float in [0, 1) when unstructured, got {sparsity!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    masks: dict[str, torch.Tensor] = {}
    for names in _buckets(scores, scope, groups):
        masks.update(_unstructured_masks(scores, names, sparsity))
    return {name: masks[name] for name in scores}


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
