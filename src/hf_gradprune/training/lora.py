"""LoRA on a pruned model: updates that respect the masks in training, and a merge that keeps them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.masks import get_masks, mask_of, reapply_masks

_HOOK = "_hf_gradprune_lora_hook"
"""Attribute of a LoRA layer: the id of the forward hook :func:`mask_lora_updates` registered on it."""


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (``get_peft_model``, or trl's ``peft_config=``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def masked_lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft LoRA layers (``lora_A``, ``lora_B``, ``base_layer``) whose base weight carries a mask."""
    return [
        module
        for module in model.modules()
        if hasattr(module, "lora_A")
        and hasattr(module, "get_delta_weight")
        and mask_of(getattr(module, "base_layer", module), "weight") is not None
    ]


def _without_pruned_update(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Take back the part of each active LoRA update that falls on pruned weights."""
    if module.disable_adapters or module.merged:
        return output
    mask = mask_of(module.base_layer, "weight")
    x = args[0]
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        pruned = module.get_delta_weight(adapter).masked_fill(mask, 0)
        if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D: (in, out)
            pruned = pruned.T
        output = output - F.linear(x.to(pruned.dtype), pruned).to(output.dtype)
    return output


def mask_lora_updates(model: nn.Module) -> list[RemovableHandle]:
    """Make every LoRA update of ``model`` respect its base layer's weight mask while it trains.

    A LoRA layer computes ``W x + s B A x``; ``B A`` is dense, so a pruned model trained with LoRA learns a
    function that its merged, re-masked weights (:func:`merge_and_unload`) no longer compute. With these
    hooks each layer computes ``W x + s (B A ⊙ M) x`` (SQFT's sparsity-preserving adapters): what is
    trained is exactly what the merge gives. Each hook costs one extra matmul of the layer's size per
    forward. ``PruningTrainer`` and the callback add them themselves to a peft model whose base weights are
    masked (before training, and after each cut); a layer hooked already is not hooked again.

    Args:
        model (`nn.Module`): a peft model whose base layers carry masks.

    Returns:
        `list[RemovableHandle]`: the hooks (``handle.remove()`` undoes them); empty when no LoRA layer is
        masked.

    Raises:
        ValueError: an adapter with ``lora_dropout`` > 0 or a LoRA variant (DoRA ...), for which the update
            cannot be taken back exactly.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from hf_gradprune.core.masks import apply_masks
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> apply_masks(base, {"0.weight": torch.eye(4, dtype=torch.bool)})
        >>> lora = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> _ = mask_lora_updates(lora)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(lora(x), merge_and_unload(lora)(x), atol=1e-6)  # trained = merged
        True
    """
    layers = [module for module in masked_lora_layers(model) if not _hooked(module)]  # once per layer
    for module in layers:
        for name in module.lora_A:
            if not isinstance(module.lora_dropout[name], nn.Identity) or name in getattr(
                module, "lora_variant", {}
            ):
                raise ValueError(
                    f"Adapter {name!r} has lora_dropout > 0 or a LoRA variant: its update on pruned weights "
                    "cannot be taken back exactly. Use LoraConfig(lora_dropout=0.0) without DoRA, or train "
                    "the update dense and let merge_and_unload drop its share on pruned weights."
                )
    handles = []
    for module in layers:
        handles.append(module.register_forward_hook(_without_pruned_update))
        vars(module)[_HOOK] = handles[-1].id
    return handles


def _hooked(module: nn.Module) -> bool:
    """Whether :func:`mask_lora_updates` already hooked ``module`` (and the hook was not removed)."""
    return vars(module).get(_HOOK) in module._forward_hooks


def merge_and_unload(model: nn.Module, **merge_kwargs: Any) -> nn.Module:
    """Merge a peft LoRA model into its base weights, keeping every weight mask exact.

    peft adds ``B @ A`` to each base weight; the product is dense, so a plain merge brings the pruned
    entries back (2:4 and unstructured sparsity are lost). The masks live on the base layers (applied with
    :func:`hf_gradprune.core.masks.apply_masks` or restored by :func:`hf_gradprune.load_pruned` before
    ``get_peft_model``), which peft puts back in place when it unloads; they are applied again right after
    the merge, so the merged model has exactly the pruned zeros and keeps its masks if it trains on.

    Args:
        model (`nn.Module`): a peft model (``get_peft_model(pruned_model, LoraConfig(...))``).
        merge_kwargs: arguments of peft's ``merge_and_unload`` (``safe_merge``, ``adapter_names``).

    Returns:
        `nn.Module`: the base model with the adapters merged and the masks applied.

    Raises:
        TypeError: ``model`` is not a peft model.
        ValueError: the merge lost masks (peft replaced the masked layers).

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from hf_gradprune.core.masks import apply_masks
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> apply_masks(base, {"0.weight": torch.eye(4, dtype=torch.bool)})
        >>> lora = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> merged = merge_and_unload(lora)
        >>> int((merged[0].weight != 0).sum())  # the diagonal: B @ A filled the rest, the mask emptied it
        4
    """
    merge = getattr(model, "merge_and_unload", None)
    if merge is None:
        raise TypeError(
            "`model` must be a peft model (`get_peft_model(model, LoraConfig(...))`), got "
            f"{type(model).__name__}."
        )
    masked = len(get_masks(model))
    merged = merge(**merge_kwargs)
    kept = len(get_masks(merged))
    if kept != masked:
        raise ValueError(
            f"The merge kept {kept} of the {masked} weight masks: peft replaced masked layers instead of "
            "putting them back. Apply the masks again with `apply_masks` on the merged model."
        )
    reapply_masks(merged)
    return merged
