"""Importance scores: heads from the gradient of the loss with respect to their gates."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .gates import HeadGates
from .record import PruningRecord

HEAD_NORMALIZATIONS = ("layer_sum", "l2", "none")
HEAD_ACCUMULATIONS = ("abs_of_sum", "sum_of_abs")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


@contextlib.contextmanager
def frozen_for_probe(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; mode and ``requires_grad`` restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def prepare_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Move tensors to the model's device and switch off the KV cache when the model has one."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def batch_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's loss on ``batch``; a clear error when the batch carries no labels."""
    loss = model(**prepare_batch(model, batch)).loss
    if loss is None:
        raise ValueError(
            "The model returned no loss: importance needs batches with labels "
            f"(got keys {sorted(batch)}). Add `labels` (for causal LMs, labels=input_ids)."
        )
    return loss


def limited(dataloader: Iterable, num_batches: int | None) -> tuple[Iterable, int | None]:
    """``(iterable, total)`` over at most ``num_batches`` batches of ``dataloader``."""
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"`num_batches` must be a positive integer or None, got {num_batches}.")
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    batches = (b for i, b in enumerate(dataloader) if num_batches is None or i < num_batches)
    return batches, total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes when ``torch.distributed`` is initialised (in place)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def normalize_per_layer(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Normalise each row by its sum (``layer_sum``), its L2 norm (``l2``) or not at all (``none``).

    NaN entries (heads already removed) are ignored and stay NaN.
    """
    _check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
    if normalize == "none":
        return scores
    present = torch.nan_to_num(scores, nan=0.0)
    if normalize == "layer_sum":
        norm = present.sum(dim=-1, keepdim=True)
    else:
        norm = present.pow(2).sum(dim=-1, keepdim=True).sqrt()
    return scores / (norm + 1e-20)


def compute_head_importance(
    model: PreTrainedModel,
    dataloader: Iterable[Mapping[str, Any]],
    num_batches: int | None = None,
    normalize: str = "layer_sum",
    accumulate: str = "abs_of_sum",
    show_progress: bool = True,
) -> torch.Tensor:
    """Head importance: |dL/dgate| of an all-ones gate per head, accumulated over batches.

    One forward and one backward per batch. The default reproduces the classic recipe: the gradient of
    the loss with respect to the head mask, summed over batches, absolute value, divided by its per-layer
    sum. The model's parameter gradients, ``requires_grad`` flags and train/eval mode are left as they
    were. Under ``torch.distributed`` the sums are all-reduced, so every rank gets the same scores.

    Args:
        model (`PreTrainedModel`): a model of a registered family that returns a loss.
        dataloader (`Iterable[Mapping]`): batches with labels.
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        normalize (`str`, *optional*, defaults to `"layer_sum"`): ``"layer_sum"``, ``"l2"`` or ``"none"``.
        accumulate (`str`, *optional*, defaults to `"abs_of_sum"`): ``"abs_of_sum"`` or ``"sum_of_abs"``.
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
    _check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
    _check_choice("accumulate", accumulate, HEAD_ACCUMULATIONS)
    batches, total = limited(dataloader, num_batches)
    seen = 0
    with frozen_for_probe(model), HeadGates(model, requires_grad=True) as gates:
        scores = torch.zeros_like(gates.gates)
        for batch in tqdm(batches, total=total, desc="Head importance", disable=not show_progress):
            (grad,) = torch.autograd.grad(batch_loss(model, batch), gates.gates)
            scores += grad.abs() if accumulate == "sum_of_abs" else grad
            seen += 1
    if seen == 0:
        raise ValueError("`dataloader` yielded no batches: head importance needs at least one.")
    scores = all_reduce_sum(scores).float().cpu()
    if accumulate == "abs_of_sum":
        scores = scores.abs()
    record = PruningRecord.from_config(model.config)
    for layer, heads in record.pruned_heads.items():
        scores[layer, heads] = float("nan")
    return normalize_per_layer(scores, normalize)
