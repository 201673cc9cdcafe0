"""LoRA on a pruned model: peft's merge, with the pruned weights kept at zero."""

from __future__ import annotations

from typing import Any

from torch import nn

from .masks import get_masks, reapply_masks


def merge_and_unload(model: nn.Module, **merge_kwargs: Any) -> nn.Module:
    """Merge a peft LoRA model into its base weights, keeping every weight mask exact.

    peft adds ``B @ A`` to each base weight; the product is dense, so a plain merge brings the pruned
    entries back (2:4 and unstructured sparsity are lost). The masks live on the base layers (applied with
    :func:`hf_gradprune.masks.apply_masks` or restored by :func:`hf_gradprune.load_pruned` before
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
        >>> from hf_gradprune.masks import apply_masks
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
