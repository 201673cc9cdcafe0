"""Weight sparsity: scores to weight masks (per row, tensor, layer or globally; unstructured or N:M), the
masks that keep what is already pruned, OWL's per-block sparsities and the sparsity schedules."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.choices import SPARSITY_SCHEDULES, SPARSITY_SCOPES, check_choice
from ..core.sharding import kept_above_lowest, on_rows, rows_group, shard_of


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
            "e.g. with `hf_gradprune.core.adapters.weight_layer_groups(model)`."
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
    count = round(sparsity * sum(scores[name].numel() for name in names))
    group = rows_group([scores[name] for name in names])
    if group is not None:  # FSDP2: the same masks from each rank's shards, never gathered
        kept = kept_above_lowest([scores[name] for name in names], count, group, _comparable)
        return dict(zip(names, kept, strict=True))
    device = scores[names[0]].device
    flat = torch.cat([_comparable(scores[name]).flatten().to(device) for name in names])
    parts = _lowest(flat, count).split([scores[name].numel() for name in names])
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
            important, as from :func:`hf_gradprune.weights.scoring.compute_weight_importance`.
        sparsity (`float`, *optional*): fraction in [0, 1) to prune; with an N:M pattern ``None`` or
            ``1 - N/M``.
        scope (`str`, *optional*, defaults to `"per_tensor"`): one of ``SPARSITY_SCOPES``.
        pattern (`str`, *optional*, defaults to `"unstructured"`): ``"unstructured"`` or ``"N:M"``.
        groups (`Mapping[str, str]`, *optional*): parameter name to layer key (e.g. ``"layer.3"``), required
            by ``scope="per_layer"``; :func:`hf_gradprune.core.adapters.weight_layer_groups` gives it.
        input_dims (`Mapping[str, int | Sequence[int]]`, *optional*): parameter name to the dimension(s)
            holding one output's inputs, for ``per_row`` and N:M; names not given use the last dimension,
            right for ``nn.Linear`` (out, in) but not for GPT-2's ``Conv1D`` (in, out, so ``0``) or a
            convolution (out, in, *kernel, so ``(1, 2, 3)``):
            :func:`hf_gradprune.core.adapters.weight_input_dims` gives them all.

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
        return {
            name: on_rows(
                lambda t, name=name: _n_m_mask(name, t, n, m, dims.get(name, -1), pattern),
                s,
                0 not in _input_axes(name, s, dims.get(name, -1)),
            )
            for name, s in scores.items()
        }
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"`sparsity` must be a float in [0, 1) when unstructured, got {sparsity!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    if scope == "per_row":
        return {
            name: on_rows(
                lambda t, name=name: _per_row_mask(name, t, sparsity, dims.get(name, -1)),
                s,
                0 not in _input_axes(name, s, dims.get(name, -1)),
            )
            for name, s in scores.items()
        }
    masks: dict[str, torch.Tensor] = {}
    for names in _buckets(scores, scope, groups):
        masks.update(_unstructured_masks(scores, names, sparsity))
    return {name: masks[name] for name in scores}


def check_mask_arguments(
    weights: Mapping[str, torch.Tensor],
    sparsity: float | None,
    scope: str = "per_tensor",
    pattern: str = "unstructured",
    groups: Mapping[str, str] | None = None,
    input_dims: Mapping[str, int | Sequence[int]] | None = None,
) -> None:
    """Raise, before anything is scored or changed, the error :func:`compute_weight_masks` would raise for
    ``weights`` (names to tensors, only their shapes are read): a bad ``sparsity``, ``scope`` or
    ``pattern``, or a weight whose inputs are not a multiple of M. It masks stand-ins with one output row
    each (the real inputs), so it costs little memory."""
    dims = input_dims or {}
    probes = {}
    for name, weight in weights.items():
        axes = _input_axes(name, weight, dims.get(name, -1))
        probes[name] = torch.zeros([size if d in axes else 1 for d, size in enumerate(weight.shape)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real call warns once
        masks_keeping(probes, sparsity, {}, scope, pattern, groups, input_dims)


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
            score = scores[name]
            mask = shard_of(mask, score)
            scores[name] = score.masked_fill(~mask.to(score.device), float("-inf"))
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
