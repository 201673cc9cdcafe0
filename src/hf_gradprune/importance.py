"""Importance scores: structures (heads, FFN neurons) from the gradient of their gates, weights from
gradients, magnitudes or inputs. Works on any model the ``Trainer`` can train; structures need an adapter.

In multi-process training every sum over calibration batches covers every rank's batches: under DDP it is
all-reduced; under FSDP2 a weight's gradient sums are sharded like the weight (each rank's gradient
reduce-scattered into its shard) and its scores are ``DTensor`` s that :mod:`.sparsity` selects from.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .adapters import (
    HEADS,
    find_adapter,
    find_target_modules,
    get_adapter,
    input_channel_dim,
    weight_dims,
)
from .arguments import (
    HEAD_ACCUMULATIONS,
    HEAD_NORMALIZATIONS,
    LAYER_IMPORTANCES,
    check_choice,
)
from .criteria import WEIGHT_CRITERIA
from .gates import LayerGates, UnitGates, gates_for
from .record import PruningRecord
from .sharding import is_sharded, replicate_like, reshard, shard_like, sum_into_shard


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


@contextlib.contextmanager
def gate_probe(model: nn.Module, structures: Sequence[str]) -> Iterator[list[UnitGates | LayerGates]]:
    """Trainable all-ones gates of ``structures`` on a :func:`frozen_for_probe` model, each of its kind
    (:func:`hf_gradprune.gates.gates_for`)."""
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
      :class:`hf_gradprune.gates.LayerGates` gate (the empirical Fisher information, as for heads and
      neurons: half of it estimates the loss increase when the layer goes, so it compares with theirs).
    - ``"block_influence"``: ShortGPT's block influence, the mean over tokens of ``1 − cos(x, block(x))``
      (how much a block turns the residual stream); no labels or gradients needed, summed over batches.

    The model's parameter gradients, ``requires_grad`` flags and train/eval mode are left as they were.
    Under ``torch.distributed`` the sums are all-reduced, so every rank gets the same scores.

    Args:
        model (`nn.Module`): a model of a registered family (that returns a loss for ``"fisher"``).
        dataloader (`Iterable[Mapping]`): batches (with labels for ``"fisher"``; causal LMs: ``labels =
            input_ids`` if absent).
        method (`str`, *optional*, defaults to `"fisher"`): one of
            :data:`hf_gradprune.arguments.LAYER_IMPORTANCES`.
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
    weights plus activations. Entries masked by :func:`hf_gradprune.masks.apply_masks` get a zero gradient
    through the mask's hook, so they score 0 with every gradient method. Under ``torch.distributed`` the
    accumulators are all-reduced, so every rank gets the same scores.

    Args:
        model (`nn.Module`): any model; for the gradient methods one that returns a loss as the ``Trainer``
            reads it (``outputs["loss"]`` or ``outputs[0]``).
        dataloader (`Iterable[Mapping]`, *optional*): batches, with labels for the gradient methods; required
            by every method except ``"magnitude"``.
        method (`str` or `Sequence[str]`, *optional*, defaults to `"taylor"`): a registered criterion
            (:data:`hf_gradprune.criteria.WEIGHT_CRITERIA`), or several: they share one pass over the data
            (one forward and backward per batch for all).
        target_modules (`Sequence[str]`, *optional*): regular expressions selecting the modules, see
            :func:`hf_gradprune.adapters.find_target_modules` (default: the attention and FFN linears of
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
