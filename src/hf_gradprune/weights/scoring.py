"""Importance of individual weights: every registered criterion's score from magnitudes, gradients or
inputs, summed over calibration batches (plain, sharded under FSDP2, or recomputed block by block)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..core.adapters import (
    find_adapter,
    find_target_modules,
    input_channel_dim,
    weight_dims,
)
from ..core.batches import (
    all_reduce_sum,
    batch_loss,
    check_finite,
    finite_loss,
    frozen_for_probe,
    limited,
    prepare_batch,
    split_examples,
    with_labels,
)
from ..core.choices import check_choice
from ..core.sharding import is_sharded, replicate_like, shard_like, sum_into_shard
from .criteria import WEIGHT_CRITERIA

#: True while a checkpointed block recomputes its forward in backward: hooks that gather forward statistics
#: skip it (they saw that forward already).
_RECOMPUTING = contextvars.ContextVar("recomputing", default=False)


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, each block of a model of a registered family runs under activation checkpointing
    (non-reentrant): backward keeps each block's input instead of its activations and recomputes one block
    at a time, so a gradient pass holds one block's activations. Other models, or ``enabled=False``, run as
    they are."""
    adapter = find_adapter(model) if enabled else None
    blocks = list(adapter.blocks(model)) if adapter is not None else []
    own = [block.__dict__.get("forward") for block in blocks]  # an instance forward (accelerate hooks)
    for block in blocks:
        block.forward = functools.partial(
            checkpoint, block.forward, use_reentrant=False, context_fn=_recompute_contexts
        )
    try:
        yield
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _add_square_sum(total: torch.Tensor, channel_dim: int, _module: nn.Module, args: tuple) -> None:
    if _RECOMPUTING.get():
        return
    inputs = args[0].detach().float().movedim(channel_dim, -1)
    total.add_(inputs.square().reshape(-1, inputs.shape[-1]).sum(dim=0))


def _add_gradient(
    sums: list[torch.Tensor], squares: list[torch.Tensor], index: int, param: nn.Parameter
) -> None:
    """Fold the gradient just accumulated into ``param.grad`` into its accumulators, and free it at once."""
    if sums:
        sums[index].add_(param.grad)
    if squares:
        squares[index].addcmul_(param.grad, param.grad)
    param.grad = None


def _add_sharded_gradient(
    sums: list[torch.Tensor],
    squares: list[torch.Tensor],
    index: int,
    sharded: nn.Parameter,
    param: nn.Parameter,
) -> None:
    """:func:`_add_gradient` for a parameter FSDP2 shards: ``param`` is its unsharded copy, whose gradient is
    this rank's alone; what is added to each accumulator (this rank's shard) is summed over ranks first
    (a reduce-scatter of the gradient, or of its square). FSDP's own reduction is skipped (``.grad`` is
    freed before it runs)."""
    grad = param.grad.float()
    if sums:
        sums[index].add_(sum_into_shard(grad, sharded))
    if squares:
        squares[index].add_(sum_into_shard(grad.square(), sharded))
    param.grad = None


def _hook_unsharded(
    sums: list[torch.Tensor],
    squares: list[torch.Tensor],
    index: int,
    sharded: nn.Parameter,
    handles: dict[int, Any],
    module: nn.Module,
    _args: tuple,
) -> None:
    """Forward pre-hook of a module whose weight FSDP2 shards: FSDP has just put the unsharded weight in
    its place, the tensor autograd differentiates; hook it once."""
    param = module.weight
    if not is_sharded(param) and id(param) not in handles:
        hook = functools.partial(_add_sharded_gradient, sums, squares, index, sharded)
        handles[id(param)] = param.register_post_accumulate_grad_hook(hook)


def _calibration_sums(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable,
    needs: set[str],
    checkpointed: bool = False,
) -> tuple[dict[str, list[torch.Tensor]], int]:
    """One pass over ``batches`` gathering what ``needs`` asks for, per target weight: ``"sum"`` (the float32
    sum over batches of dL/dW), ``"square"`` (the sum over single examples of its square: each batch is then
    split into its rows, one backward each), ``"inputs"`` (per module, the sum of its squared inputs per input
    channel over every token and position); and the batch count.

    Gradients are folded into their accumulators as soon as backward produces them and then freed, so the
    pass holds the model, the accumulators and only the gradients in flight. The model's own ``.grad`` are
    put back afterwards. ``checkpointed``: the blocks' activations are recomputed in backward
    (:func:`checkpointed_blocks`).
    """
    weights = [m.weight for m in modules.values()]
    sums = {  # FSDP2: the accumulators are sharded like their weight (this rank's shard)
        need: [torch.zeros_like(w.to_local() if is_sharded(w) else w, dtype=torch.float32) for w in weights]
        for need in ("sum", "square")
        if need in needs
    }
    handles = []
    if "inputs" in needs:
        sums["inputs"] = [
            torch.zeros(
                m.weight.shape[weight_dims(m)[1]] * getattr(m, "groups", 1),
                dtype=torch.float32,
                device=m.weight.device,
            )
            for m in modules.values()
        ]
        handles += [
            m.register_forward_pre_hook(functools.partial(_add_square_sum, total, input_channel_dim(m)))
            for m, total in zip(modules.values(), sums["inputs"], strict=True)
        ]
    gradients = bool({"sum", "square"} & needs)
    saved_grads = [w.grad for w in weights]
    unsharded: dict[int, Any] = {}
    seen = skipped = 0
    try:
        with frozen_for_probe(model), checkpointed_blocks(model, checkpointed and gradients):
            if gradients:
                for index, (module, weight) in enumerate(zip(modules.values(), weights, strict=True)):
                    weight.grad = None
                    weight.requires_grad_(True)
                    accumulators = sums.get("sum"), sums.get("square"), index
                    if is_sharded(weight):
                        hook = functools.partial(_hook_unsharded, *accumulators, weight, unsharded)
                        handles.append(module.register_forward_pre_hook(hook))
                    else:
                        hook = functools.partial(_add_gradient, *accumulators)
                        handles.append(weight.register_post_accumulate_grad_hook(hook))
            for batch in batches:
                if "square" in needs:  # the empirical Fisher sums squares over examples, not batches
                    for row in split_examples(batch):
                        loss = batch_loss(model, row)
                        if torch.isfinite(loss):
                            loss.backward()
                        else:  # a row with no labelled token (all padding) has no loss to learn from
                            skipped += 1
                elif gradients:
                    finite_loss(batch_loss(model, batch), seen).backward()
                else:
                    with torch.no_grad():
                        model(**prepare_batch(model, with_labels(model, batch)))
                seen += 1
    finally:
        for handle in [*handles, *unsharded.values()]:
            handle.remove()
        for weight, grad in zip(weights, saved_grads, strict=True):
            weight.grad = grad
    if skipped:
        warnings.warn(f"Weight importance skipped {skipped} examples whose loss is not finite.", stacklevel=3)
    return sums, seen


def compute_weight_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    method: str | Sequence[str] = "taylor",
    target_modules: Sequence[str] | None = None,
    num_batches: int | None = None,
    show_progress: bool = True,
    gblm_alpha: float = 100.0,
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """Weight importance: one score per entry of every target weight, higher is more important.

    With ``g`` the gradient of the loss with respect to a weight ``w`` on one batch and ``Σ`` the sum over
    batches (over single examples for ``Σ g²``: see below), the methods are:

    - ``"magnitude"``: ``|w|``; needs no data.
    - ``"gradient"``: ``|Σ g|``.
    - ``"taylor"``: ``|w · Σ g|``, the first-order Taylor estimate of the loss change when ``w`` is removed.
    - ``"fisher"``: ``Σ g²``, the empirical Fisher diagonal.
    - ``"obd"``: ``w² · Σ g²``, the diagonal second-order saliency of Optimal Brain Damage with the empirical
      Fisher (per weight, Molchanov's ``Σ (w·g)²``): unlike first-order Taylor it does not cancel at a
      trained model.
    - ``"combined"``: ``|w| / mean(|w|) + |Σ g| / mean(|Σ g|)``, each term divided by its mean over the
      tensor so that magnitude and gradient weigh alike.
    - ``"wanda"``: ``|w| · sqrt(Σ x²)``, ``x`` the weight's input and the sum over every token of every batch
      (padding included), per input column (Sun et al., 2023); forward passes only, labels not needed. For a
      convolution the sum runs over every position of the input channel, shared by its kernel entries.
    - ``"gblm"``: ``|w| · (α · sqrt(Σ g²) + sqrt(Σ x²))``, GBLM-Pruner (Das et al., 2023): Wanda plus the
      gradient norm over calibration examples, weighted by ``gblm_alpha`` (the paper's 100).

    ``Σ g²`` (``fisher``, ``obd``, ``gblm``) is the empirical Fisher, a sum over examples: each batch is split
    into its rows, one forward and backward each (the same arithmetic as the whole batch, in smaller calls).
    Squares of batch gradients would average the examples first and lose most of the signal: on SmolLM2 at
    50% per tensor ``obd`` measured perplexity 176 from 8 batches of 4 sequences, 149 from the same 32
    sequences one by one (``benchmarks/llm.py``). Methods scored together share the passes, so with one of
    these beside it ``Σ g`` too is summed over single examples.

    Gradient methods take one forward and one backward per batch with respect to the target weights only:
    the model's ``.grad``, ``requires_grad`` flags and train/eval mode are left as they were (the probe runs
    in eval mode). Each target weight gets one float32 accumulator, which becomes its score; a gradient is
    folded into it as soon as backward produces it and freed, so peak memory stays near twice the targeted
    weights plus activations. Entries masked by :func:`hf_gradprune.core.masks.apply_masks` get a zero
    gradient through the mask's hook, so they score 0 with every gradient method. Under ``torch.distributed``
    the accumulators are all-reduced, so every rank gets the same scores.

    Args:
        model (`nn.Module`): any model; for the gradient methods one that returns a loss as the ``Trainer``
            reads it (``outputs["loss"]`` or ``outputs[0]``).
        dataloader (`Iterable[Mapping]`, *optional*): batches, with labels for the gradient methods; required
            by every method except ``"magnitude"``.
        method (`str` or `Sequence[str]`, *optional*, defaults to `"taylor"`): a registered criterion
            (:data:`hf_gradprune.weights.criteria.WEIGHT_CRITERIA`), or several: they share one pass over the
            data (one forward and backward per batch for all).
        target_modules (`Sequence[str]`, *optional*): regular expressions selecting the modules, see
            :func:`hf_gradprune.core.adapters.find_target_modules` (default: the attention and FFN linears of
            every block of a registered family; every Linear/Conv but the output layer of any other model).
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.
        gblm_alpha (`float`, *optional*, defaults to 100.0): the gradient weight of ``"gblm"``.

    Returns:
        `dict[str, torch.Tensor]`: parameter name (``"<module>.weight"``) to float32 scores of the weight's
        own shape, on the weight's device: (out, in) for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D``,
        (out, in, *kernel) for convolutions. With several methods: method to that mapping.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}
        >>> scores = compute_weight_importance(model, [batch], method="taylor", show_progress=False)
        >>> scores["bert.encoder.layer.0.intermediate.dense.weight"].shape
        torch.Size([37, 32])
    """
    methods = [method] if isinstance(method, str) else list(method)
    for name in methods:
        check_choice("method", name, tuple(WEIGHT_CRITERIA))
    needs_data = any(WEIGHT_CRITERIA[name].needs for name in methods)
    if needs_data and dataloader is None:
        raise ValueError(
            f"method={method!r} needs a `dataloader` of batches; only 'magnitude' works without data."
        )
    modules = find_target_modules(model, target_modules)
    if not needs_data:
        if dataloader is not None or num_batches is not None:
            warnings.warn(
                "`dataloader` and `num_batches` are ignored with method='magnitude' (it needs no data).",
                stacklevel=2,
            )
        return score_modules(model, modules, None, method)
    batches, total = limited(dataloader, num_batches)
    batches = tqdm(batches, total=total, desc=f"Weight importance ({method})", disable=not show_progress)
    return score_modules(model, modules, batches, method, gblm_alpha)


def _reduced(weight: torch.Tensor, need: str, total: torch.Tensor) -> torch.Tensor:
    """One accumulator summed over processes. Under FSDP2 the gradient sums are this rank's shard, summed
    already, and become ``DTensor`` s sharded like ``weight`` (so are the scores then); the input sums are
    all-reduced and replicated."""
    if not is_sharded(weight):
        return all_reduce_sum(total)
    if need == "inputs":
        return replicate_like(all_reduce_sum(total), weight)
    return shard_like(total, weight)


def score_modules(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable | None,
    method: str | Sequence[str],
    gblm_alpha: float = 100.0,
    checkpointed: bool = False,
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """The scores of :func:`compute_weight_importance` for the weights of ``modules`` (qualified name to
    module), in one pass over ``batches`` whatever the number of methods: one method gives parameter name
    to score, a sequence of methods gives method to that mapping. ``checkpointed``: the gradient pass
    recomputes block activations (:func:`checkpointed_blocks`)."""
    methods = [method] if isinstance(method, str) else list(method)
    for name in methods:
        check_choice("method", name, tuple(WEIGHT_CRITERIA))
    needs = set().union(*(WEIGHT_CRITERIA[name].needs for name in methods))
    if not needs:
        check_finite(model)  # the calibration pass checks it otherwise
    sums: dict[str, list[torch.Tensor]] = {}
    if needs:
        sums, seen = _calibration_sums(model, dict(modules), batches, needs, checkpointed)
        if seen == 0:
            raise ValueError("`dataloader` yielded no batches: weight importance needs at least one.")
    scores: dict[str, dict[str, torch.Tensor]] = {name: {} for name in methods}
    for index, (name, module) in enumerate(modules.items()):
        reduced = {need: _reduced(module.weight, need, values[index]) for need, values in sums.items()}
        for method_name in methods:
            scores[method_name][f"{name}.weight"] = WEIGHT_CRITERIA[method_name].score(
                module, reduced, gblm_alpha
            )
        for values in sums.values():
            values[index] = None  # free the accumulators as their scores are made
    return scores[methods[0]] if isinstance(method, str) else scores
