"""Weight pruning without the Trainer: one call that scores, selects and applies persistent masks, at
once or block by block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import (
    find_adapter,
    find_target_modules,
    weight_input_dims,
    weight_layer_groups,
)
from ..core.choices import (
    RECONSTRUCTIONS,
    SPARSITY_ALLOCATIONS,
    WEIGHT_SOLVERS,
    check_choice,
)
from ..core.masks import apply_masks, masks_of
from ..core.sharding import is_sharded, local_part, whole
from .blockwise import prune_blockwise
from .criteria import WEIGHT_CRITERIA, needs_calibration
from .scoring import score_modules
from .sparsity import check_mask_arguments, masks_keeping


def _in_passes(layers: list[dict[str, nn.Module]], passes: int) -> list[dict[str, nn.Module]]:
    """``layers`` (in order) joined into at most ``passes`` groups of consecutive layers with about the same
    number of weights each."""
    sizes = [sum(m.weight.numel() for m in layer.values()) for layer in layers]
    share = sum(sizes) / min(passes, len(layers))
    groups: list[dict[str, nn.Module]] = [{}]
    done = 0
    for layer, size in zip(layers, sizes, strict=True):
        if groups[-1] and done + size / 2 > share * len(groups):
            groups.append({})
        groups[-1].update(layer)
        done += size
    return groups


def prune_weights(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]] | None,
    sparsity: float | None,
    method: str = "taylor",
    scope: str = "per_tensor",
    pattern: str = "unstructured",
    target_modules: Sequence[str] | None = None,
    sequential: bool = False,
    gblm_alpha: float = 100.0,
    show_progress: bool = True,
    reconstruction: str = "none",
    allocation: str = "uniform",
    scoring_passes: int = 1,
) -> dict[str, torch.Tensor]:
    """Score the target weights on ``batches`` and mask them to ``sparsity``; weights masked already stay
    masked (a new mask is the old one ANDed with the new choice).

    With ``sequential`` the layers are pruned one after the other, each scored on what comes through the
    layers already pruned, as Wanda and SparseGPT run. A model of a registered family goes block by block
    (:func:`hf_gradprune.weights.blockwise.prune_blockwise`: the inputs of each block are captured once, about
    two forwards of the model in all), and gradient criteria use the block-local loss ``‖block(x)‖₂`` of each
    example (Wanda++'s regional gradients), not the model's loss. Any other model prunes one target module
    after the other, gradient criteria with the model's own loss (a full forward and backward per layer).
    ``method="sparsegpt"``, a ``reconstruction`` and ``allocation="owl"`` always run block by block.

    Args:
        model (`nn.Module`): the model.
        batches (`Sequence[Mapping]`, *optional*): calibration batches (with labels for gradient criteria;
            a causal LM may omit them); ``None`` for a criterion that needs no data (``magnitude``).
        sparsity (`float`, *optional*): as for :func:`hf_gradprune.compute_weight_masks`.
        method (`str`, *optional*, defaults to `"taylor"`): a weight importance (see
            :func:`hf_gradprune.compute_weight_importance`), or ``"sparsegpt"`` (SparseGPT, which chooses
            the masks and updates the kept weights with each layer's Hessian:
            :func:`hf_gradprune.weights.reconstruction.sparsegpt_prune`).
        scope (`str`, *optional*, defaults to `"per_tensor"`): one of ``SPARSITY_SCOPES``; not ``global``
            with ``sequential`` (each layer is scored on a different model).
        pattern (`str`, *optional*, defaults to `"unstructured"`): ``unstructured`` or ``N:M``.
        target_modules (`Sequence[str]`, *optional*): as for :func:`hf_gradprune.compute_weight_importance`.
        sequential (`bool`, *optional*, defaults to `False`): prune layer by layer.
        gblm_alpha (`float`, *optional*, defaults to 100.0): the gradient weight of ``gblm``.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.
        reconstruction (`str`, *optional*, defaults to `"none"`): how the kept weights of each block are
            updated once its masks are chosen: ``"least_squares"`` (each layer's outputs on its inputs,
            SparseGPT's update under the chosen mask), ``"adam"`` (Adam steps on the block's output error
            against the dense model, Wanda++'s regional optimization) or ``"least_squares_adam"``.
        allocation (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"owl"`` (a sparsity per
            block from the outliers of its Wanda scores, the same total; block by block, unstructured).
        scoring_passes (`int`, *optional*, defaults to 1): one shot, score the target weights in this many
            groups of consecutive layers (at most one per layer), each in its own pass over ``batches``
            holding only its group's float32 accumulators and scores; with more than one pass the gradient
            pass of a registered family also recomputes each block's activations in backward
            (checkpointing) instead of keeping them. The same masks as one pass, applied once all are
            chosen, for about ``scoring_passes`` times the compute; not with ``scope="global"``.

    Returns:
        `dict[str, torch.Tensor]`: the masks applied, parameter name to bool mask (the model's own masks,
        not copies: copy one before changing it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = prune_weights(model, None, 0.5, method="magnitude", scope="per_row")
        >>> list(masks), int(masks["0.weight"].sum())
        (['0.weight'], 32)
    """
    check_choice("method", method, (*WEIGHT_CRITERIA, *WEIGHT_SOLVERS))
    check_choice("reconstruction", reconstruction, RECONSTRUCTIONS)
    check_choice("allocation", allocation, SPARSITY_ALLOCATIONS)
    if allocation == "owl" and pattern != "unstructured":
        raise ValueError(
            f"allocation='owl' spreads an unstructured sparsity over blocks, got pattern={pattern!r}."
        )
    by_blocks = method == "sparsegpt" or reconstruction != "none" or allocation == "owl"
    if (sequential or by_blocks) and scope == "global":
        raise ValueError(
            "`scope` 'global' cannot be used layer by layer (each layer is scored on a different model): "
            "use 'per_row', 'per_tensor' or 'per_layer'."
        )
    if by_blocks and (find_adapter(model) is None or batches is None):
        raise ValueError(
            f"method={method!r} with reconstruction={reconstruction!r} and allocation={allocation!r} runs "
            "block by block on calibration `batches` and needs a model of a registered family "
            "(`hf_gradprune.supported_model_types()`); otherwise prune with a weight importance, "
            "reconstruction='none' and allocation='uniform'."
        )
    if isinstance(scoring_passes, bool) or not isinstance(scoring_passes, int) or scoring_passes < 1:
        raise ValueError(f"`scoring_passes` must be an int >= 1, got {scoring_passes!r}.")
    if scoring_passes > 1 and (sequential or by_blocks or scope == "global"):
        raise ValueError(
            f"`scoring_passes`={scoring_passes} splits one-shot scoring (sequential=False, method not "
            "'sparsegpt', reconstruction='none', allocation='uniform') over groups of layers, and a 'global' "
            "scope compares every layer at once: use scoring_passes=1 here (block by block already holds one "
            "block's statistics at a time)."
        )
    if method == "sparsegpt" and scope not in ("per_row", "per_tensor"):
        raise ValueError(f"method='sparsegpt' takes scope 'per_row' or 'per_tensor', got {scope!r}.")
    modules = find_target_modules(model, target_modules)
    layer_of = weight_layer_groups(model, target_modules)
    dims = weight_input_dims(model, target_modules)
    weights = {f"{name}.weight": module.weight for name, module in modules.items()}
    check_mask_arguments(weights, sparsity, scope, pattern, layer_of, dims)
    with_data = needs_calibration(method)
    if find_adapter(model) is not None and (by_blocks or (sequential and with_data)):
        return prune_blockwise(
            model,
            list(batches),
            sparsity,
            modules,
            method=method,
            scope=scope,
            pattern=pattern,
            reconstruction=reconstruction,
            gblm_alpha=gblm_alpha,
            allocation=allocation,
            show_progress=show_progress,
        )
    layers: dict[str, dict[str, nn.Module]] = {}
    for name, module in modules.items():
        layers.setdefault(layer_of[f"{name}.weight"], {})[name] = module
    groups = list(layers.values()) if sequential else _in_passes(list(layers.values()), scoring_passes)
    if with_data:
        batches = list(batches)  # read once per group
    applied: dict[str, torch.Tensor] = {}
    steps = tqdm(
        groups,
        desc=f"{'Layer by layer' if sequential else 'Scoring passes'} ({method})",
        disable=not (show_progress and len(groups) > 1),
    )
    for group in steps:
        data = batches
        if with_data and show_progress and len(groups) == 1:
            data = tqdm(batches, desc=f"Weight importance ({method})")
        scores = score_modules(model, group, data, method, gblm_alpha, checkpointed=scoring_passes > 1)
        masks = masks_keeping(
            scores,
            sparsity,
            masks_of(group),
            scope=scope,
            pattern=pattern,
            groups={name: layer_of[name] for name in scores},
            input_dims={name: dims[name] for name in scores},
        )
        del scores
        if sequential:  # the next layer is scored on this one pruned
            apply_masks(model, masks, copy=False)
        applied.update({name: whole(mask) for name, mask in masks.items()})  # FSDP2: every rank all
    if not sequential:  # one shot: every group scored on the model as it came
        apply_masks(model, applied, copy=False)  # the masks returned are the model's: one copy
    return applied


def zero_pruned_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: dict) -> None:
    """Zero the optimizer state (e.g. Adam moments) of pruned entries, so momentum cannot revive them."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        state = inner.state.get(params[name])
        for value in (state or {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                local = local_part(mask, value) if is_sharded(value) else mask  # FSDP2: the shard's part
                (value.to_local() if is_sharded(value) else value).mul_(local.to(value.device, value.dtype))
