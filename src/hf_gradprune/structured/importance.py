"""Importance of structures: every unit of a structure (heads, FFN neurons, whole layers) scored by the
gradient of its gate, or layers by their block influence."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import (
    HEADS,
    get_adapter,
)
from ..core.batches import all_reduce_sum, batch_loss, finite_loss, frozen_for_probe, limited, prepare_batch
from ..core.choices import HEAD_ACCUMULATIONS, HEAD_NORMALIZATIONS, LAYER_IMPORTANCES, check_choice
from ..core.record import PruningRecord
from .gates import LayerGates, UnitGates, gates_for


@contextlib.contextmanager
def gate_probe(model: nn.Module, structures: Sequence[str]) -> Iterator[list[UnitGates | LayerGates]]:
    """Trainable all-ones gates of ``structures`` on a :func:`frozen_for_probe` model, each of its kind
    (:func:`hf_gradprune.structured.gates.gates_for`)."""
    adapter = get_adapter(model)
    with frozen_for_probe(model), contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(gates_for(adapter.structure(name), model, requires_grad=True))
            for name in structures
        ]


def normalize_per_layer(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Normalise each row by its sum (``layer_sum``), its L2 norm (``l2``) or not at all (``none``).

    NaN entries (units already removed) are ignored and stay NaN.
    """
    check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
    if normalize == "none":
        return scores
    present = torch.nan_to_num(scores, nan=0.0)
    if normalize == "layer_sum":
        norm = present.sum(dim=-1, keepdim=True)
    else:
        norm = present.pow(2).sum(dim=-1, keepdim=True).sqrt()
    return scores / (norm + 1e-20)


def compute_unit_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    structures: Sequence[str] = (HEADS,),
    num_batches: int | None = None,
    normalize: str = "none",
    accumulate: str = "fisher",
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Importance of every unit of ``structures`` from the gradient ``g = dL/dgate`` of an all-ones gate.

    One forward and one backward per batch for all structures together. ``accumulate`` says how the
    per-batch gradients become a score:

    - ``"fisher"``: ``Σ g²``, the empirical Fisher information of the gate (Kwon et al., 2022): half of it
      estimates the loss increase when the unit is removed, so scores of heads and neurons compare.
    - ``"sum_of_abs"``: ``Σ |g|``.
    - ``"abs_of_sum"``: ``|Σ g|``, the classic head-mask recipe (Michel et al., 2019). At a fine-tuned model
      the signed gradients of different batches cancel, and the ranking is close to chance.

    The model's parameter gradients, ``requires_grad`` flags and train/eval mode are left as they were.
    Under ``torch.distributed`` the sums are all-reduced, so every rank gets the same scores.

    Args:
        model (`nn.Module`): a model of a registered family that returns a loss.
        dataloader (`Iterable[Mapping]`): batches with labels (causal LMs: ``labels = input_ids`` if absent).
        structures (`Sequence[str]`, *optional*, defaults to `("heads",)`): ``"heads"`` and/or ``"ffn"``;
            ``"layers"`` adds the Fisher information of a gate on each block's residual branch
            (``(num_layers,)``, on the same scale as the units').
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        normalize (`str`, *optional*, defaults to `"none"`): ``"layer_sum"``, ``"l2"`` or ``"none"``.
        accumulate (`str`, *optional*, defaults to `"fisher"`): ``"fisher"``, ``"sum_of_abs"`` or
            ``"abs_of_sum"``.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict[str, torch.Tensor]`: structure name to float32 ``(num_layers, num_units)`` scores on the CPU
        in original unit indices; units already removed are NaN (``"layers"``: ``(num_layers,)``).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}
        >>> scores = compute_unit_importance(model, [batch], ("heads", "ffn"), show_progress=False)
        >>> scores["heads"].shape, scores["ffn"].shape
        (torch.Size([2, 4]), torch.Size([2, 37]))
    """
    check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
    check_choice("accumulate", accumulate, HEAD_ACCUMULATIONS)
    if isinstance(structures, str):
        raise TypeError(f"`structures` must be a sequence of names, got the string {structures!r}.")
    batches, total = limited(dataloader, num_batches)
    seen = 0
    with gate_probe(model, structures) as gates:
        scores = [torch.zeros_like(g.gates) for g in gates]
        for batch in tqdm(batches, total=total, desc="Unit importance", disable=not show_progress):
            grads = torch.autograd.grad(finite_loss(batch_loss(model, batch), seen), [g.gates for g in gates])
            for score, grad in zip(scores, grads, strict=True):
                if accumulate == "fisher":
                    score.addcmul_(grad, grad)
                else:
                    score.add_(grad.abs() if accumulate == "sum_of_abs" else grad)
            seen += 1
    if seen == 0:
        raise ValueError("`dataloader` yielded no batches: importance needs at least one.")
    record = PruningRecord.from_config(model.config)
    adapter = get_adapter(model)
    result = {}
    for name, score in zip(structures, scores, strict=True):
        score = all_reduce_sum(score).float().cpu()
        if accumulate == "abs_of_sum":
            score = score.abs()
        structure = adapter.structure(name)
        if structure.spans_layers:  # one unit per layer, numbered as the model stands: nothing to normalise
            result[name] = score
            continue
        for layer, units in record.pruned.get(name, {}).items():
            score[layer, units] = float("nan")
        result[name] = normalize_per_layer(score, normalize)
    return result


def compute_head_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    num_batches: int | None = None,
    normalize: str = "layer_sum",
    accumulate: str = "fisher",
    show_progress: bool = True,
) -> torch.Tensor:
    """Head importance, ``(num_layers, num_heads)``: :func:`compute_unit_importance` of the heads.

    With ``accumulate="abs_of_sum"`` and ``normalize="layer_sum"`` this is the classic recipe (the
    gradient of the loss with respect to transformers 4's ``head_mask``, summed over batches, absolute
    value, divided by its per-layer sum); the default ``"fisher"`` ranks heads better at a trained model
    (``benchmarks/heads_curve.py``).

    Args:
        model (`nn.Module`): a model of a registered family that returns a loss.
        dataloader (`Iterable[Mapping]`): batches with labels.
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        normalize (`str`, *optional*, defaults to `"layer_sum"`): ``"layer_sum"``, ``"l2"`` or ``"none"``.
        accumulate (`str`, *optional*, defaults to `"fisher"`): ``"fisher"``, ``"sum_of_abs"`` or
            ``"abs_of_sum"``.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `torch.Tensor`: float32 ``(num_layers, num_heads)`` on the CPU in original head indices;
        heads already removed are NaN.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}
        >>> compute_head_importance(model, [batch], show_progress=False).shape
        torch.Size([2, 4])
    """
    return compute_unit_importance(
        model, dataloader, (HEADS,), num_batches, normalize, accumulate, show_progress
    )[HEADS]


def _block_influence(
    model: nn.Module, batches: Iterable, total: int | None, show_progress: bool
) -> tuple[torch.Tensor, int]:
    """Σ over batches of each block's mean ``1 − cos(x, block(x))`` over the batch's tokens (padding left out
    when the batch has an attention mask), and the batch count."""
    blocks = get_adapter(model).blocks(model)
    sums = torch.zeros(len(blocks))
    weights: list[torch.Tensor | None] = [None]

    def record(layer: int, _module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        change = 1 - torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
        keep = weights[0]
        mean = change.mean() if keep is None else (change * keep).sum() / keep.sum().clamp_min(1)
        sums[layer] += float(mean)

    handles = [block.register_forward_hook(functools.partial(record, i)) for i, block in enumerate(blocks)]
    seen = 0
    try:
        with frozen_for_probe(model), torch.no_grad():
            for batch in tqdm(batches, total=total, desc="Layer importance", disable=not show_progress):
                inputs = prepare_batch(model, {k: v for k, v in batch.items() if k != "labels"})
                mask = inputs.get("attention_mask")
                weights[0] = mask.float() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                model(**inputs)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    return sums, seen


def compute_layer_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    method: str = "fisher",
    num_batches: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Importance of every whole layer (transformer block), ``(num_layers,)``: the lowest go first.

    - ``"fisher"``: ``Σ g²`` over batches of the gradient ``g = dL/dgate`` of an all-ones
      :class:`hf_gradprune.structured.gates.LayerGates` gate (the empirical Fisher information, as for heads
      and neurons: half of it estimates the loss increase when the layer goes, so it compares with theirs).
    - ``"block_influence"``: ShortGPT's block influence, the mean over tokens of ``1 − cos(x, block(x))``
      (how much a block turns the residual stream); no labels or gradients needed, summed over batches.

    The model's parameter gradients, ``requires_grad`` flags and train/eval mode are left as they were.
    Under ``torch.distributed`` the sums are all-reduced, so every rank gets the same scores.

    Args:
        model (`nn.Module`): a model of a registered family (that returns a loss for ``"fisher"``).
        dataloader (`Iterable[Mapping]`): batches (with labels for ``"fisher"``; causal LMs: ``labels =
            input_ids`` if absent).
        method (`str`, *optional*, defaults to `"fisher"`): one of
            :data:`hf_gradprune.core.choices.LAYER_IMPORTANCES`.
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `torch.Tensor`: float32 ``(num_layers,)`` on the CPU, layers numbered as the model stands.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}
        >>> compute_layer_importance(model, [batch], show_progress=False).shape
        torch.Size([3])
    """
    check_choice("method", method, LAYER_IMPORTANCES)
    batches, total = limited(dataloader, num_batches)
    if method == "block_influence":
        scores, seen = _block_influence(model, batches, total, show_progress)
    else:
        seen = 0
        with frozen_for_probe(model), LayerGates(model, requires_grad=True) as gates:
            scores = torch.zeros_like(gates.gates)
            for batch in tqdm(batches, total=total, desc="Layer importance", disable=not show_progress):
                (grad,) = torch.autograd.grad(finite_loss(batch_loss(model, batch), seen), [gates.gates])
                scores.addcmul_(grad, grad)
                seen += 1
    if not seen:
        raise ValueError("`dataloader` yielded no batches: importance needs at least one.")
    return all_reduce_sum(scores).float().cpu()
