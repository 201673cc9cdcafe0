"""Importance scores: heads from the gradient of their gates, weights from gradients, magnitudes or inputs."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .adapters import get_adapter, weight_dims
from .arguments import HEAD_ACCUMULATIONS, HEAD_NORMALIZATIONS, WEIGHT_IMPORTANCES, check_choice
from .gates import HeadGates
from .record import PruningRecord


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
    check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
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
    check_choice("normalize", normalize, HEAD_NORMALIZATIONS)
    check_choice("accumulate", accumulate, HEAD_ACCUMULATIONS)
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


def _block_linears(model: PreTrainedModel) -> Iterator[nn.Module]:
    """The attention projections and FFN linears of every block, as the family's adapter declares them."""
    adapter = get_adapter(model)
    for layer in range(len(adapter.blocks(model))):
        parts = adapter.attention_parts(model, layer)
        attention = (parts.query, parts.key, parts.value, parts.qkv, parts.output)
        yield from (module for module in attention if module is not None)
        yield from adapter.ffn_modules(model, layer)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"`target_modules` entry {pattern!r} is not a valid regular expression: {err}."
        ) from err


def target_linear_modules(
    model: PreTrainedModel, target_modules: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The modules whose weights are pruned, by qualified name, in ``model.named_modules()`` order.

    By default the attention query/key/value (or fused qkv) and output projections and the FFN linears of
    every transformer block, as the family's adapter declares them: never embeddings, norms or the
    classifier head. ``target_modules`` replaces the default: regular expressions, each tried with
    ``re.search`` on the qualified names of the ``nn.Linear`` and GPT-2 ``Conv1D`` modules.

    Args:
        model (`PreTrainedModel`): a model of a registered family (any model when `target_modules` is given).
        target_modules (`Sequence[str]`, *optional*): regular expressions selecting the modules instead.

    Returns:
        `dict[str, nn.Module]`: qualified module name to module.

    Raises:
        ValueError: no module matches `target_modules`, or a pattern is not a valid regular expression.
        TypeError: `target_modules` is a single string instead of a sequence of them.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> modules = target_linear_modules(model)
        >>> len(modules), next(iter(modules))
        (12, 'bert.encoder.layer.0.attention.self.query')
        >>> list(target_linear_modules(model, ["classifier"]))
        ['classifier']
    """
    if target_modules is None:
        wanted = {id(module) for module in _block_linears(model)}
        return {name: module for name, module in model.named_modules() if id(module) in wanted}
    if isinstance(target_modules, str):
        raise TypeError(
            f"`target_modules` must be a sequence of regular expressions, got the string {target_modules!r}; "
            f"wrap it in a list: [{target_modules!r}]."
        )
    patterns = [_compile(pattern) for pattern in target_modules]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    found = {name: module for name, module in linears.items() if any(p.search(name) for p in patterns)}
    if not found:
        raise ValueError(
            f"`target_modules` {list(target_modules)} matched no nn.Linear or Conv1D module of "
            f"{type(model).__name__}; patterns are searched in qualified names such as {list(linears)[:3]}."
        )
    return found


def weight_input_dims(model: PreTrainedModel, target_modules: Sequence[str] | None = None) -> dict[str, int]:
    """Parameter name to the input dimension of each target weight: the ``input_dims`` of N:M selection.

    ``nn.Linear`` stores its weight as (out, in), so 1; GPT-2's ``Conv1D`` as (in, out), so 0.

    Args:
        model (`PreTrainedModel`): as for :func:`target_linear_modules`.
        target_modules (`Sequence[str]`, *optional*): as for :func:`target_linear_modules`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> weight_input_dims(model)["transformer.h.0.attn.c_attn.weight"]
        0
    """
    modules = target_linear_modules(model, target_modules)
    return {f"{name}.weight": weight_dims(module)[1] for name, module in modules.items()}


def weight_layer_groups(
    model: PreTrainedModel, target_modules: Sequence[str] | None = None
) -> dict[str, str]:
    """Parameter name to its block, ``"layer.<i>"``: the ``groups`` of ``scope="per_layer"`` selection.

    A target outside every block (only reachable through `target_modules`) is a group of its own, keyed by
    its module name.

    Args:
        model (`PreTrainedModel`): a model of a registered family.
        target_modules (`Sequence[str]`, *optional*): as for :func:`target_linear_modules`.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> groups = weight_layer_groups(model, ["layer.1.output.dense", "classifier"])
        >>> sorted(set(groups.values()))
        ['classifier', 'layer.1']
    """
    blocks = {id(block): index for index, block in enumerate(get_adapter(model).blocks(model))}
    prefixes = {f"{name}.": f"layer.{blocks[id(m)]}" for name, m in model.named_modules() if id(m) in blocks}
    return {
        f"{name}.weight": next((layer for prefix, layer in prefixes.items() if name.startswith(prefix)), name)
        for name in target_linear_modules(model, target_modules)
    }


def _magnitude(module: nn.Module) -> torch.Tensor:
    """A new float32 tensor ``|weight|``."""
    return module.weight.detach().abs().float()


def _mean_normalized(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` divided in place by their mean (all-zero scores stay zero)."""
    return scores.div_(scores.mean().clamp_min(torch.finfo(torch.float32).tiny))


def _gradient_sums(
    model: PreTrainedModel, weights: list[nn.Parameter], batches: Iterable, squared: bool
) -> tuple[list[torch.Tensor], int]:
    """Per weight, the float32 sum over batches of dL/dW (of its square when ``squared``); batch count."""
    sums = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]
    seen = 0
    with frozen_for_probe(model):
        for weight in weights:
            weight.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(batch_loss(model, batch), weights, materialize_grads=True)
            for total, grad in zip(sums, grads, strict=True):
                if squared:
                    total.addcmul_(grad, grad)
                else:
                    total.add_(grad)
            seen += 1
    return sums, seen


def _add_square_sum(total: torch.Tensor, _module: nn.Module, args: tuple) -> None:
    inputs = args[0].detach()
    total.add_(inputs.float().square().reshape(-1, inputs.shape[-1]).sum(dim=0))


def _input_square_sums(
    model: PreTrainedModel, modules: dict[str, nn.Module], batches: Iterable
) -> tuple[list[torch.Tensor], int]:
    """Per module, the float32 sum over all tokens of its squared inputs, one entry per input; batch count."""
    sums = [
        torch.zeros(m.weight.shape[weight_dims(m)[1]], dtype=torch.float32, device=m.weight.device)
        for m in modules.values()
    ]
    handles = [
        module.register_forward_pre_hook(functools.partial(_add_square_sum, total))
        for module, total in zip(modules.values(), sums, strict=True)
    ]
    seen = 0
    try:
        with frozen_for_probe(model), torch.no_grad():
            for batch in batches:
                model(**prepare_batch(model, batch))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    return sums, seen


def _finalize(method: str, module: nn.Module, total: torch.Tensor) -> torch.Tensor:
    """The score of ``module.weight`` from its all-reduced accumulator (reused in place)."""
    if method == "wanda":
        return _magnitude(module).mul_(total.sqrt_().unsqueeze(1 - weight_dims(module)[1]))
    if method == "fisher":
        return total
    if method == "taylor":
        return total.mul_(module.weight.detach()).abs_()
    total.abs_()
    if method == "gradient":
        return total
    return _mean_normalized(total).add_(_mean_normalized(_magnitude(module)))


def compute_weight_importance(
    model: PreTrainedModel,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    method: str = "taylor",
    target_modules: Sequence[str] | None = None,
    num_batches: int | None = None,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Weight importance: one score per entry of every target weight, higher is more important.

    With ``g`` the gradient of the loss with respect to a weight ``w`` on one batch and ``Σ`` the sum over
    batches, the methods are:

    - ``"magnitude"``: ``|w|``; needs no data.
    - ``"gradient"``: ``|Σ g|``.
    - ``"taylor"``: ``|w · Σ g|``, the first-order Taylor estimate of the loss change when ``w`` is removed.
    - ``"fisher"``: ``Σ g²``, the empirical Fisher diagonal.
    - ``"combined"``: ``|w| / mean(|w|) + |Σ g| / mean(|Σ g|)``, each term divided by its mean over the
      tensor so that magnitude and gradient weigh alike.
    - ``"wanda"``: ``|w| · sqrt(Σ x²)``, ``x`` the weight's input and the sum over every token of every batch
      (padding included), per input column (Sun et al., 2023); forward passes only, labels not needed.

    Gradient methods take one forward and one backward per batch, through ``torch.autograd.grad`` with
    respect to the target weights only: the model's ``.grad``, ``requires_grad`` flags and train/eval mode
    are left as they were (the probe runs in eval mode). Each target weight gets one float32 accumulator,
    which becomes its score. Entries masked by :func:`hf_gradprune.masks.apply_masks` get a zero gradient
    through the mask's hook, so they score 0 with every gradient method. Under ``torch.distributed`` the
    accumulators are all-reduced, so every rank gets the same scores.

    Args:
        model (`PreTrainedModel`): a model that returns a loss (for the gradient methods).
        dataloader (`Iterable[Mapping]`, *optional*): batches, with labels for the gradient methods; required
            by every method except ``"magnitude"``.
        method (`str`, *optional*, defaults to `"taylor"`): one of ``WEIGHT_IMPORTANCES``.
        target_modules (`Sequence[str]`, *optional*): regular expressions selecting the modules, see
            :func:`target_linear_modules` (default: attention and FFN linears of every block).
        num_batches (`int`, *optional*): stop after this many batches (default: all).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict[str, torch.Tensor]`: parameter name (``"<module>.weight"``) to float32 scores of the weight's
        own shape, on the weight's device: (out, in) for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D``.

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
    check_choice("method", method, WEIGHT_IMPORTANCES)
    if method != "magnitude" and dataloader is None:
        raise ValueError(
            f"method={method!r} needs a `dataloader` of batches; only 'magnitude' works without data."
        )
    modules = target_linear_modules(model, target_modules)
    if method == "magnitude":
        if dataloader is not None or num_batches is not None:
            warnings.warn(
                "`dataloader` and `num_batches` are ignored with method='magnitude' (it needs no data).",
                stacklevel=2,
            )
        return {f"{name}.weight": _magnitude(module) for name, module in modules.items()}
    batches, total = limited(dataloader, num_batches)
    batches = tqdm(batches, total=total, desc=f"Weight importance ({method})", disable=not show_progress)
    if method == "wanda":
        sums, seen = _input_square_sums(model, modules, batches)
    else:
        weights = [module.weight for module in modules.values()]
        sums, seen = _gradient_sums(model, weights, batches, squared=method == "fisher")
    if seen == 0:
        raise ValueError("`dataloader` yielded no batches: weight importance needs at least one.")
    return {
        f"{name}.weight": _finalize(method, module, all_reduce_sum(total))
        for (name, module), total in zip(modules.items(), sums, strict=True)
    }
