"""Layer-by-layer pruning block by block, as SparseGPT and Wanda run it: the calibration inputs of block 0 are
captured once; each block is scored, pruned (and its kept weights updated) on the inputs the pruned blocks
before it produce, then run alone to make the next block's inputs. The cost is about two forwards of the
model plus the scoring, not a replay of the model per block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import get_adapter, input_channel_dim, weight_dims
from ..core.batches import check_finite, frozen_for_probe, prepare_batch
from ..core.masks import apply_masks, masks_of
from .criteria import WEIGHT_CRITERIA
from .reconstruction import add_to_hessian, least_squares_update, sparsegpt_prune, tune_block
from .sparsity import masks_keeping, outlier_ratio, owl_sparsities, parse_sparsity_pattern


class _Captured(Exception):
    """Stops the capturing forward once the blocks' inputs it needs are recorded."""


@contextlib.contextmanager
def _recording(blocks: Sequence[nn.Module], calls: list[list[tuple[tuple, dict]]]) -> Iterator[None]:
    """Pre-hooks appending each block's ``(args, kwargs)`` to ``calls[i]``; the last one stops the forward."""

    def record(index: int, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[index].append((args, kwargs))
        if index == len(blocks) - 1:
            raise _Captured

    handles = [
        block.register_forward_pre_hook(functools.partial(record, i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Mapping[str, Any]]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Block 0's input hidden states per batch, and each block's call ``(args, kwargs)`` per batch (attention
    masks, position embeddings). Blocks of one kind get the same call, so the model stops at block 0, as
    SparseGPT and Wanda do; a config whose ``layer_types`` mix kinds (sliding-window and full attention) is
    run through every block to record each one's own."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None) or []
    recorded = list(blocks) if len(set(kinds)) > 1 else [blocks[0]]
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in recorded]
    with torch.no_grad(), _recording(recorded, calls):
        for batch in batches:
            inputs = prepare_batch(model, {k: v for k, v in batch.items() if k != "labels"})
            with contextlib.suppress(_Captured):
                model(**inputs)
    hidden = [args[0] for args, _ in calls[0]]
    return hidden, calls * len(blocks) if len(recorded) == 1 else calls


def _run(block: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """The block's output hidden states on ``hidden``, called as the model calls it."""
    args, kwargs = call
    output = block(hidden, *args[1:], **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def _as_rows(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as ``(out, in)`` (GPT-2's ``Conv1D`` stores ``(in, out)``), or back."""
    return tensor.transpose(-1, -2) if weight_dims(module)[0] == 1 else tensor


def _add_example_gradients(entry: dict, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> None:
    """Fold the per-example weight gradients ``δᵢᵀ xᵢ`` of one batch (the layer's inputs and output gradients)
    into ``Σ g`` and ``Σ g²``, one example at a time (a weight-sized temporary, not one per example)."""
    for example_grad, example_inputs in zip(grad.flatten(1, -2), inputs.flatten(1, -2), strict=True):
        gradient = _as_rows(module, example_grad.float().T @ example_inputs.float())
        if "sum" in entry:
            entry["sum"].add_(gradient)
        if "square" in entry:
            entry["square"].addcmul_(gradient, gradient)


def _statistics_hook(
    entry: dict,
    channel_dim: int,
    seen: dict[int, tuple[torch.Tensor, dict]],
    module: nn.Module,
    args: tuple,
    output: torch.Tensor,
) -> None:
    inputs = args[0].detach()
    if "shared" not in entry:  # the first batch: share the input statistics of layers fed the same tensor
        first = seen.setdefault(id(args[0]), (args[0], entry))[1]
        entry["shared"] = first is not entry
        for need in ("inputs", "hessian", "count"):
            if need in entry:
                entry[need] = first[need]
    if not entry["shared"]:
        features = inputs.float().movedim(channel_dim, -1)
        if "inputs" in entry:
            entry["inputs"].add_(features.square().reshape(-1, features.shape[-1]).sum(dim=0))
        if "hessian" in entry:
            add_to_hessian(entry["hessian"], entry["count"], features)
    if output.requires_grad and entry.keys() & {"sum", "square"}:
        output.register_hook(functools.partial(_add_example_gradients, entry, module, inputs))


@contextlib.contextmanager
def _statistics(
    modules: Mapping[str, nn.Module], needs: set[str], seen: dict[int, tuple[torch.Tensor, dict]]
) -> Iterator[dict[str, dict[str, Any]]]:
    """Forward hooks gathering per module what ``needs`` asks for from every input it sees: the sum of
    squared inputs per channel (``"inputs"``), the Hessian ``2 X Xᵀ / n`` (``"hessian"``), and when a loss
    summed over examples is backpropagated, ``Σ g`` (``"sum"``) and ``Σ g²`` (``"square"``) over examples of
    the weight gradient, each example's from the layer's inputs and output gradients (one backward).

    Layers fed the same tensor (query, key and value; gate and up) share one ``"inputs"`` and ``"hessian"``,
    found on the first batch from ``seen`` (input tensors by ``id``, held so no id is reused; the caller
    empties it after that batch)."""
    stats: dict[str, dict[str, Any]] = {}
    handles = []
    for name, module in modules.items():
        rows = _as_rows(module, module.weight)
        entry = stats[name] = {}
        for need in needs & {"sum", "square"}:
            entry[need] = torch.zeros_like(module.weight, dtype=torch.float32)
        if "inputs" in needs:
            entry["inputs"] = torch.zeros(rows.shape[1], device=rows.device)
        if "hessian" in needs:
            entry["hessian"] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            entry["count"] = [0]
        hook = functools.partial(_statistics_hook, entry, input_channel_dim(module), seen)
        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _gather(
    block: nn.Module,
    modules: Mapping[str, nn.Module],
    calls: Sequence[tuple[tuple, dict]],
    hidden: Sequence[torch.Tensor],
    needs: set[str],
) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor]]:
    """One pass of the block over ``hidden`` gathering :func:`_statistics`, and its outputs; with a gradient
    need, it backpropagates the block-local loss ``Σᵢ ‖block(xᵢ)‖₂``, the L2 norm of the block's output on
    each example (Wanda++'s regional loss), through this block alone: to the block's input, so the weight
    gradients the hooks rebuild per example are never formed."""
    gradients = bool(needs & {"sum", "square"})
    seen: dict[int, tuple[torch.Tensor, dict]] = {}
    outputs = []
    with frozen_for_probe(block), _statistics(modules, needs, seen) as stats:
        for call, x in zip(calls, hidden, strict=True):
            with torch.set_grad_enabled(gradients):
                x = x.detach().requires_grad_(gradients)
                output = _run(block, call, x)
                if gradients:
                    torch.autograd.grad(output.float().flatten(1).norm(dim=1).sum(), x)
            outputs.append(output.detach())
            seen.clear()
    return stats, outputs


def _owl_sparsities(
    blocks: Sequence[nn.Module],
    by_block: Sequence[Mapping[str, nn.Module]],
    calls: Sequence[Sequence[tuple[tuple, dict]]],
    hidden: Sequence[torch.Tensor],
    sparsity: float,
) -> list[float]:
    """OWL's sparsity per block from the outlier ratio of its Wanda scores in the dense model (one pass);
    ``sparsity`` for blocks without targets."""
    ratios = {}
    for index, block in enumerate(blocks):
        group = by_block[index]
        stats, hidden = _gather(block, group, calls[index], hidden, {"inputs"})
        if group:
            scores = [WEIGHT_CRITERIA["wanda"].score(m, stats[name], 0.0) for name, m in group.items()]
            ratios[index] = outlier_ratio(scores)
    sparsities = [sparsity] * len(by_block)
    for index, chosen in zip(ratios, owl_sparsities(list(ratios.values()), sparsity), strict=True):
        sparsities[index] = chosen
    return sparsities


def _block_masks(
    modules: Mapping[str, nn.Module],
    stats: Mapping[str, Mapping[str, Any]],
    method: str,
    sparsity: float | None,
    scope: str,
    pattern: str,
    reconstruction: str,
    existing: Mapping[str, torch.Tensor],
    gblm_alpha: float,
) -> dict[str, torch.Tensor]:
    """Choose the block's masks (and with SparseGPT or least squares, write the updated weights)."""
    n_m = parse_sparsity_pattern(pattern)
    if method == "sparsegpt":
        masks = {}
        for name, module in modules.items():
            weight, keep = sparsegpt_prune(
                _as_rows(module, module.weight),
                stats[name]["hessian"],
                sparsity=None if n_m else sparsity,
                n_m=n_m,
                per_row=scope == "per_row",
            )
            with torch.no_grad():
                module.weight.copy_(_as_rows(module, weight))
            masks[f"{name}.weight"] = _as_rows(module, keep) & existing.get(f"{name}.weight", True)
        return masks
    scores = {
        f"{name}.weight": WEIGHT_CRITERIA[method].score(module, stats[name], gblm_alpha)
        for name, module in modules.items()
    }
    masks = masks_keeping(
        scores,
        sparsity,
        existing,
        scope=scope,
        pattern=pattern,
        groups=dict.fromkeys(scores, "block"),
        input_dims={f"{name}.weight": weight_dims(m)[1] for name, m in modules.items()},
    )
    if reconstruction.startswith("least_squares"):
        for name, module in modules.items():
            keep = _as_rows(module, masks[f"{name}.weight"])
            weight = least_squares_update(_as_rows(module, module.weight), stats[name]["hessian"], keep)
            with torch.no_grad():
                module.weight.copy_(_as_rows(module, weight))
    return masks


def prune_blockwise(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    sparsity: float | None,
    modules: Mapping[str, nn.Module],
    method: str = "wanda",
    scope: str = "per_row",
    pattern: str = "unstructured",
    reconstruction: str = "none",
    gblm_alpha: float = 100.0,
    adam_epochs: int = 5,
    adam_lr: float = 1e-4,
    allocation: str = "uniform",
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune the target weights of a model of a registered family block by block (see the module docstring).

    Scores per block: ``magnitude`` from the weights; ``wanda`` (and the input half of ``gblm``) from the
    block's inputs as the pruned blocks before it give them; the gradient criteria (``gradient``, ``taylor``,
    ``fisher``, ``obd``, ``combined``, ``gblm``) from the block-local loss ``‖block(x)‖₂`` of each calibration
    example (Wanda++'s regional gradients: ``gblm`` so is its regional gradient score), never the model's
    own loss, which would need the whole model; ``sparsegpt`` chooses and updates with the layer Hessians.
    Then ``reconstruction``: ``least_squares`` updates each layer's kept weights to restore its outputs on
    its inputs (:func:`hf_gradprune.weights.reconstruction.least_squares_update`), ``adam`` takes
    ``adam_epochs`` passes of Adam steps on the block's output error against the dense model's outputs
    (Wanda++'s regional optimization), ``least_squares_adam`` both. Masks stay exact; masks already on the
    model are kept (ANDed).

    Args:
        model (`nn.Module`): a model of a registered family.
        batches (`Sequence[Mapping]`): calibration batches (labels are not used).
        sparsity (`float`, *optional*): the fraction pruned (``None`` with an ``N:M`` pattern).
        modules (`Mapping[str, nn.Module]`): the target modules by qualified name, all inside blocks.
        method (`str`, *optional*, defaults to `"wanda"`): a weight importance or ``"sparsegpt"``.
        scope (`str`, *optional*, defaults to `"per_row"`): ``per_row``, ``per_tensor`` or ``per_layer``
            (the block).
        pattern (`str`, *optional*, defaults to `"unstructured"`): ``unstructured`` or ``N:M``.
        reconstruction (`str`, *optional*, defaults to `"none"`): one of
            :data:`hf_gradprune.core.choices.RECONSTRUCTIONS`.
        gblm_alpha (`float`, *optional*, defaults to 100.0): the gradient weight of ``gblm``.
        adam_epochs (`int`, *optional*, defaults to 5): passes over the batches with ``adam``.
        adam_lr (`float`, *optional*, defaults to 1e-4): Adam's learning rate with ``adam`` (better than
            1e-5 on SmolLM2-135M; a step moves a weight by about this much, so scale it with the weights).
        allocation (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` (every block pruned to
            ``sparsity``) or ``"owl"`` (OWL: blocks whose Wanda scores in the dense model hold more outliers
            keep more, :func:`hf_gradprune.weights.sparsity.owl_sparsities`, one more pass; unstructured
            only).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over blocks.

    Returns:
        `dict[str, torch.Tensor]`: the masks applied, parameter name to bool mask (the model's own masks,
        not copies: copy one before changing it).
    """
    blocks = get_adapter(model).blocks(model)
    names = {id(m): name for name, m in model.named_modules()}
    by_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name, module in modules.items():
        owner = next((i for i, block in enumerate(blocks) if name.startswith(f"{names[id(block)]}.")), None)
        if owner is None:
            raise ValueError(
                f"Layer-by-layer pruning prunes the weights of the transformer blocks; {name!r} is outside "
                "them: leave it out of `target_modules`, or prune it in one shot (`sequential=False`)."
            )
        by_block[owner][name] = module
    if not batches:
        raise ValueError("`batches` is empty: layer-by-layer pruning needs calibration data.")
    check_finite(model)  # before the first block is pruned
    needs = set() if method == "sparsegpt" else set(WEIGHT_CRITERIA[method].needs)
    if method == "sparsegpt" or reconstruction.startswith("least_squares"):
        needs.add("hessian")
    was_training = model.training
    model.eval()
    applied: dict[str, torch.Tensor] = {}
    try:
        pruned, calls = capture_block_inputs(model, blocks, batches)
        dense = list(pruned)  # the dense model's hidden states: the targets of `adam`
        last = max(i for i, group in enumerate(by_block) if group)  # the blocks after it stay as they are
        sparsities = [sparsity] * len(blocks)
        if allocation == "owl":
            sparsities = _owl_sparsities(blocks[: last + 1], by_block, calls, pruned, sparsity)
        steps = tqdm(range(last + 1), desc=f"Block by block ({method})", disable=not show_progress)
        for index in steps:
            block, group, block_calls = blocks[index], by_block[index], calls[index]
            if reconstruction.endswith("adam"):
                with torch.no_grad():
                    dense = [_run(block, call, x) for call, x in zip(block_calls, dense, strict=True)]
            if not group:
                with torch.no_grad():
                    pruned = [_run(block, call, x) for call, x in zip(block_calls, pruned, strict=True)]
                continue
            stats, _ = _gather(block, group, block_calls, pruned, needs)
            masks = _block_masks(
                group,
                stats,
                method,
                sparsities[index],
                scope,
                pattern,
                reconstruction,
                masks_of(group),
                gblm_alpha,
            )
            apply_masks(model, masks, copy=False)  # the masks returned are the model's: one copy
            applied.update(masks)
            if reconstruction.endswith("adam"):
                inputs = pruned
                tune_block(
                    block,
                    lambda i, block=block, calls=block_calls, inputs=inputs: _run(block, calls[i], inputs[i]),
                    dense,
                    [module.weight for module in group.values()],
                    epochs=adam_epochs,
                    lr=adam_lr,
                )
            with torch.no_grad():
                pruned = [_run(block, call, x) for call, x in zip(block_calls, pruned, strict=True)]
    finally:
        model.train(was_training)
    return applied
