"""Batches and losses every pass reads: labels for causal LMs, one forward's loss, batches split into
examples, a bounded walk over a dataloader, sums over processes, and the guards around a probe."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .sharding import reshard


def check_finite(model: nn.Module) -> None:
    """Refuse a model with a parameter that is NaN or infinite (as after a diverged run): its scores would be
    noise, and the pruning chosen from them arbitrary. The error names the first such parameter."""
    for name, parameter in model.named_parameters():
        bad = ~torch.isfinite(parameter.detach())
        if bad.any():
            raise ValueError(
                f"Parameter {name!r} has {int(bad.sum())} of {parameter.numel()} values that are NaN or "
                "infinite: the model diverged, and pruning it would rank units and weights by noise. Prune "
                "a checkpoint from before the divergence."
            )


def finite_loss(loss: torch.Tensor, index: int) -> torch.Tensor:
    """``loss``, or a ``ValueError`` naming calibration batch ``index`` when it is NaN or infinite."""
    if not torch.isfinite(loss.detach()):
        raise ValueError(
            f"The loss on calibration batch {index} is {float(loss):g} with finite weights: importance needs "
            "a finite loss (a batch with no labelled token, or an overflow in a low precision dtype?)."
        )
    return loss


@contextlib.contextmanager
def frozen_for_probe(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; mode and ``requires_grad`` restored after. A model with
    a weight that is not finite is refused first (:func:`check_finite`)."""
    check_finite(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    reshard(model)  # FSDP2: parameters gathered before now would keep their old `requires_grad`
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        reshard(model, refresh=True)  # and those gathered inside; FSDP2 sees the parameters trainable again


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(model.forward).parameters


def prepare_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Move tensors to the model's device and switch off the KV cache when the model has one."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "use_cache" in _forward_parameters(model):
        inputs["use_cache"] = False
    return inputs


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal language model (its loss takes ``labels=input_ids``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@functools.cache
def _warn_label_free() -> None:
    warnings.warn(
        "Calibration batches without `labels` on a causal LM: using labels = input_ids, padding "
        "(attention_mask == 0) ignored.",
        stacklevel=4,
    )


def with_labels(model: nn.Module, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """``batch``, or for a causal LM without labels the batch with ``labels = input_ids`` (padding -100)."""
    if "labels" in batch or "input_ids" not in batch or not is_causal_lm(model):
        return batch
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    _warn_label_free()
    return {**batch, "labels": labels}


def batch_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's loss on ``batch``, read as the ``Trainer`` does (``outputs["loss"]`` or ``outputs[0]``).

    A causal LM batch without labels gets ``labels = input_ids``; any other batch without a loss is a
    clear error.
    """
    outputs = model(**prepare_batch(model, with_labels(model, batch)))
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0] if outputs else None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "The model returned no loss: importance needs batches the model computes a loss on "
            f"(got keys {sorted(batch)}); add `labels`, or return the loss as `outputs['loss']` or "
            "`outputs[0]` as the Trainer expects."
        )
    return loss


def split_examples(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``batch`` as batches of one: every tensor whose first dimension is the batch size (that of
    its first tensor) is sliced, anything else is passed to every row.

    Example:
        >>> rows = split_examples({"input_ids": torch.tensor([[1, 2], [3, 4]]), "use_cache": False})
        >>> [row["input_ids"].tolist() for row in rows], rows[1]["use_cache"]
        ([[[1, 2]], [[3, 4]]], False)
    """
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        return [dict(batch)]
    size = tensors[0].shape[0]
    return [
        {
            key: value[row : row + 1]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
            else value
            for key, value in batch.items()
        }
        for row in range(size)
    ]


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


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over processes when ``torch.distributed`` is initialised (in place)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def take_batches(dataloader: Iterable, count: int) -> list[Any]:
    """The first ``count`` batches of a fresh pass over ``dataloader``, leaving the training RNG untouched.

    An accelerate-prepared loader is read through its ``base_dataloader``, so the Trainer's own epoch
    iterator and accelerate's gradient-state bookkeeping are not disturbed.
    """
    loader = getattr(dataloader, "base_dataloader", dataloader)
    with torch.random.fork_rng(devices=[]):
        batches = list(itertools.islice(iter(loader), count))
    if len(batches) < count:
        warnings.warn(
            f"`--importance_batches` is {count} but the training data gives {len(batches)} batch(es) per "
            f"pass: importance is computed on those {len(batches)}.",
            stacklevel=2,
        )
    return batches
