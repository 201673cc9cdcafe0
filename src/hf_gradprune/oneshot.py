"""One-shot pruning outside the ``Trainer``: structures to a FLOPs budget with rescaling, whole layers by
importance, and weights layer by layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import (
    find_adapter,
    find_target_modules,
    get_adapter,
    weight_input_dims,
    weight_layer_groups,
)
from .arguments import (
    HEAD_ACCUMULATIONS,
    MASK_TUNING_METHODS,
    RECONSTRUCTIONS,
    SPARSITY_ALLOCATIONS,
    WEIGHT_SOLVERS,
    check_choice,
)
from .blockwise import prune_blockwise
from .criteria import WEIGHT_CRITERIA, needs_calibration
from .flops import check_flops_target, flops_in_rounds, neuron_multiples
from .importance import compute_layer_importance, compute_unit_importance, score_modules
from .mask_tuning import capture_targets, capture_teacher, distill_unit_scales, rescale_units
from .masks import apply_masks, masks_of
from .sharding import whole
from .sparsity import check_mask_arguments, masks_keeping
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
    renumbering = [name for name in structures if get_adapter(model).structure(name).spans_layers]
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
            :func:`hf_gradprune.flops.neuron_multiples`).
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
    (:func:`hf_gradprune.blockwise.prune_blockwise`: the inputs of each block are captured once, about two
    forwards of the model in all), and gradient criteria use the block-local loss ``‖block(x)‖₂`` of each
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
            :func:`hf_gradprune.reconstruction.sparsegpt_prune`).
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
