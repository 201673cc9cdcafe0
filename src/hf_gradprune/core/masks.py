"""Persistent weight masks: pruned weights stay exactly zero through training, state-dict keys unchanged.

A zero weight still receives a gradient, so zeroing it once is not pruning. :func:`apply_masks` does three
things per masked parameter ``<name>`` of a module:

- stores the mask as a non-persistent buffer ``<name>_mask`` on the module, so ``state_dict()`` keys, and
  with them ``save_pretrained``/``from_pretrained``, are the model's own (no ``weight_orig`` as in
  ``torch.nn.utils.prune``); the mask moves with ``model.to()``;
- zeroes the masked entries in place;
- registers a hook on the parameter that zeroes the gradient of the masked entries. It acts on every
  gradient before it reaches ``.grad`` (and on ``torch.autograd.grad`` too), so it holds under gradient
  accumulation, clipping and mixed precision, and an optimizer that only ever sees zero gradients for an
  entry keeps zero state for it: Adam's ``exp_avg`` and ``exp_avg_sq`` of pruned entries stay 0.

The hook alone is not enough: weights move without a gradient, above all through momentum gathered
before the mask was applied (Adam keeps stepping an entry whose ``exp_avg`` is not zero), but also through
optimizers or wrappers that write weights back from their own copies. Call :func:`reapply_masks` after
every optimizer step.

A new mask for a parameter replaces its old one, it is not combined with it: masks are expected to be
monotone, so when pruning gradually pass the AND of the old and the new mask (entries a new mask keeps
again resume training from zero). Masks are saved in a safetensors file of their own,
:data:`MASKS_FILENAME`, next to the checkpoint (:mod:`hf_gradprune.core.mask_files`).

Under DDP the mask buffers, like every module buffer, are broadcast from rank 0 before each forward: masks
must agree across ranks, which the pruning callback ensures by all-reducing importance before selection.
Under FSDP2 (``fully_shard``) a sharded parameter is masked on its local shard: the buffer keeps the whole
mask, the gradient is zeroed after FSDP's reduce-scatter (a post-accumulate-grad hook: tensor hooks never
fire on a sharded parameter) and :func:`reapply_masks` zeroes the shard. ``fully_shard`` replaces the
parameters: apply masks after it; a parameter replaced since its mask was applied gets its hook again at
the next :func:`reapply_masks`. Masks chosen on the shards (``DTensor`` s) are gathered into whole masks
first: every rank holds every mask, one byte per weight.

``copy.deepcopy`` and pickling keep the mask buffers but, like every tensor hook, not the gradient hooks:
give a copy its hooks back with ``apply_masks(copy, get_masks(copy))``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> apply_masks(model, {"0.weight": torch.tensor([[True, False] * 2] * 2)})
    >>> model.state_dict().keys()
    odict_keys(['0.weight', '0.bias'])
    >>> compute_sparsity(model)["overall"]
    0.5
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PretrainedConfig

from .record import CONFIG_KEY, PruningRecord
from .sharding import is_sharded, local_part, whole

# Attribute of a masked module: parameter short name -> its _Hook.
MASKS_FILENAME = "pruning_masks.safetensors"
"""The masks file's name in a checkpoint folder (:func:`hf_gradprune.core.mask_files.save_masks`)."""
_HOOKS = "_hf_gradprune_mask_hooks"


def _buffer_name(attr: str) -> str:
    return f"{attr}_mask"


def _masked(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(parameter name, owning module, parameter short name)`` of every masked parameter of ``model``."""
    for prefix, module in model.named_modules():
        for attr in vars(module).get(_HOOKS, {}):
            yield (f"{prefix}.{attr}" if prefix else attr), module, attr


def _local_mask(param: nn.Parameter, mask: torch.Tensor) -> torch.Tensor | None:
    """For a parameter sharded as a ``DTensor`` (``fully_shard``), the part of ``mask`` its local shard
    holds (no communication: every rank has the whole mask); ``None`` for a plain parameter."""
    return local_part(mask, param) if is_sharded(param) else None


class _ShardGradientMask:
    """Post-accumulate-grad hook of a sharded parameter: its tensor hooks never see a gradient (FSDP2 runs
    the unsharded copy in autograd and hands the reduced shard to ``.grad``), so the shard's gradient is
    zeroed where it lands, before clipping and the optimizer step."""

    def __init__(self, local: torch.Tensor):
        self.local = local

    def __call__(self, param: nn.Parameter) -> None:
        param.grad.to_local().mul_(self.local)


class _Hook:
    """What :func:`apply_masks` registered on one parameter: the gradient hook's handle (none on a frozen
    parameter, such as a LoRA base weight: it gets no gradient), the parameter (weakly: one replaced by a
    wrapper must not be kept alive) and, sharded, its local mask."""

    def __init__(self, module: nn.Module, attr: str):
        param = getattr(module, attr)
        self.param = weakref.ref(param)
        self.local = _local_mask(param, getattr(module, _buffer_name(attr)))
        self.handle: RemovableHandle | None = None
        if not param.requires_grad:
            return
        if self.local is None:
            self.handle = param.register_hook(_GradientMask(module, attr))
        else:
            self.handle = param.register_post_accumulate_grad_hook(_ShardGradientMask(self.local))

    def hooks(self, param: nn.Parameter) -> bool:
        """Whether the hook sits on ``param`` (not on a parameter it replaced, nor lost with a pickle; a
        parameter frozen when masked and trained since needs one)."""
        live = self.param is not None and self.param() is param
        return live and (self.handle is not None or not param.requires_grad)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

    def __getstate__(self) -> dict:
        return {**vars(self), "param": None}  # a weak reference does not pickle; nor do hooks


def _zero_masked(module: nn.Module, attr: str) -> None:
    """Zero the masked entries in place (no temporary: this runs after every optimizer step). A parameter
    replaced since its mask was applied (``fully_shard`` swaps in sharded ones) gets its hook again."""
    hooks = vars(module)[_HOOKS]
    if not hooks[attr].hooks(getattr(module, attr)):
        hooks[attr].remove()
        hooks[attr] = _Hook(module, attr)
    param, local = getattr(module, attr), hooks[attr].local
    with torch.no_grad():
        if local is None:
            param.mul_(getattr(module, _buffer_name(attr)))
        else:
            param.to_local().mul_(local)


def note_masks(model: nn.Module, changed: Iterable[str] | None = None) -> None:
    """Count the masked tensors, and each one's masked entries, in the pruning record of ``model.config``,
    so a saved folder says what its masks file holds, and a folder saved without it (``save_pretrained``)
    has its masks back from the weights' zeros (:func:`masks_from_zeros`). ``changed``: the only masks set
    since the last count (the others keep theirs: layer-by-layer pruning masks a block at a time); ``None``
    counts every mask again (after layers are removed, names move)."""
    config = getattr(model, "config", None)
    masked = {name: getattr(module, _buffer_name(attr)) for name, module, attr in _masked(model)}
    if not isinstance(config, PretrainedConfig) or (not masked and not hasattr(config, CONFIG_KEY)):
        return
    record = PruningRecord.from_config(config)
    fresh = None if changed is None else set(changed)
    counted = {} if fresh is None else {k: v for k, v in record.masked_entries.items() if k not in fresh}
    record.weight_masks = len(masked)
    record.masked_entries = {
        name: counted[name] if name in counted else int((~mask).sum()) for name, mask in masked.items()
    }
    record.save_to_config(config)


def masks_from_zeros(model: nn.Module, record: PruningRecord) -> dict[str, torch.Tensor]:
    """The masks of ``record.masked_entries`` rebuilt from ``model``'s loaded weights: a masked entry is
    zero, so where a tensor has exactly as many zeros as it had masked entries, its mask is ``weight != 0``,
    exactly. A tensor with another count of zeros is a ``ValueError`` naming it (its masks file is needed).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False], [True, True]])})
        >>> masks_from_zeros(model, PruningRecord(masked_entries={"weight": 1}))["weight"].tolist()
        [[True, False], [True, True]]
    """
    params = _parameters(model, record.masked_entries)
    masks = {name: param.detach() != 0 for name, param in params.items()}
    zeros = {name: int((~mask).sum()) for name, mask in masks.items()}
    wrong = {name: count for name, count in zeros.items() if count != record.masked_entries[name]}
    if wrong:
        name, count = next(iter(wrong.items()))
        raise ValueError(
            f"The weights cannot give back their masks without {MASKS_FILENAME}: {name!r} has {count} zeros "
            f"where {record.masked_entries[name]} entries were masked ({len(wrong)} such tensors). Save with "
            "`save_pruned`, `PruningTrainer.save_model` or a checkpoint, which write the masks file."
        )
    return masks


def check_mask(name: str, mask: object) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"The mask of {name!r} must be a torch.bool tensor (True keeps), got {kind}.")


def _parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """The named parameters of ``model``; unknown names raise, listing a few valid ones."""
    params = dict(model.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise ValueError(
            f"{type(model).__name__} has no parameter {unknown[:3]} ({len(unknown)} unknown in all): "
            f"use names from `model.named_parameters()`, such as {list(params)[:3]}."
        )
    return {name: params[name] for name in names}


class _GradientMask:
    """Gradient hook zeroing the masked entries; it reads the buffer at each call to follow ``model.to()``.

    It zeroes the fresh gradient in place (a new tensor per step and parameter costs as much as the step's
    matrix products on a CPU); the gradient of a parameter reaches nothing but its accumulation.
    """

    def __init__(self, module: nn.Module, attr: str):
        self.module = module
        self.buffer = _buffer_name(attr)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        mask = getattr(self.module, self.buffer)
        return grad.mul_(mask) if grad.is_contiguous() else grad * mask  # an expanded gradient: a copy


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], copy: bool = True) -> None:
    """Prune ``model`` persistently: zero the masked weights and their gradients from now on.

    Every name and mask is checked before the model changes. A parameter masked before gets the new mask
    instead of the old one (pass ``old & new`` to keep both) and a single hook.

    Args:
        model (`nn.Module`): the model to prune.
        masks (`Mapping[str, torch.Tensor]`): parameter name (as in ``model.named_parameters()``) to a bool
            mask of the parameter's shape, ``True`` keeps; on any device; a ``DTensor`` (chosen on FSDP2
            shards) is gathered whole.
        copy (`bool`, *optional*, defaults to `True`): keep copies of the masks; ``False`` keeps the given
            tensors where they already sit on the parameter's device (no second copy of every mask: the
            caller then owns the model's masks and must not change them).

    Raises:
        ValueError: an unknown name, a mask of the wrong shape, or
            a module with a ``<name>_mask`` attribute of its own (e.g. from ``torch.nn.utils.prune``).
        TypeError: a mask that is not a bool tensor.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> name = "bert.encoder.layer.0.intermediate.dense.weight"
        >>> mask = torch.rand(37, 32) > 0.5
        >>> apply_masks(model, {name: mask})
        >>> bool((model.get_parameter(name)[~mask] == 0).all()), is_masked(model)
        (True, True)
    """
    params = _parameters(model, masks)
    masks = {name: whole(mask) for name, mask in masks.items()}  # sharded masks (FSDP2) are kept whole
    owners: dict[str, tuple[nn.Module, str]] = {}
    for name, mask in masks.items():
        check_mask(name, mask)
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(
                f"The mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}."
            )
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        if hasattr(module, _buffer_name(attr)) and attr not in vars(module).get(_HOOKS, {}):
            raise ValueError(
                f"{prefix or type(model).__name__!r} already has a `{_buffer_name(attr)}` attribute of its "
                "own (from torch.nn.utils.prune?): remove it before apply_masks."
            )
        owners[name] = module, attr
    for name, mask in masks.items():
        module, attr = owners[name]
        param = params[name]
        hooks = vars(module).setdefault(_HOOKS, {})
        if attr in hooks:
            hooks.pop(attr).remove()
        module.register_buffer(
            _buffer_name(attr), mask.detach().to(param.device, copy=copy), persistent=False
        )
        hooks[attr] = _Hook(module, attr)
        _zero_masked(module, attr)
    note_masks(model, changed=masks)


def reapply_masks(model: nn.Module) -> None:
    """Zero every masked weight again: call after each optimizer step.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False]])})
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> reapply_masks(model)
        >>> model.weight.tolist()
        [[1.0, 0.0]]
    """
    for _, module, attr in _masked(model):
        _zero_masked(module, attr)


def remove_masks(model: nn.Module) -> None:
    """Remove every mask buffer and gradient hook; the weights keep their zeros.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False]])})
        >>> remove_masks(model)
        >>> is_masked(model), model.weight[0, 1].item() == 0
        (False, True)
    """
    for module in model.modules():
        for attr, handle in vars(module).pop(_HOOKS, {}).items():
            handle.remove()
            delattr(module, _buffer_name(attr))
    note_masks(model)


def mask_of(module: nn.Module, attr: str = "weight") -> torch.Tensor | None:
    """The mask of ``module``'s own parameter ``attr`` (on its device), or ``None`` when it is not masked.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> apply_masks(layer, {"weight": torch.tensor([[True, False]])})
        >>> mask_of(layer), mask_of(layer, "bias")
        (tensor([[ True, False]]), None)
    """
    return getattr(module, _buffer_name(attr)) if attr in vars(module).get(_HOOKS, {}) else None


def masks_of(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The weight masks of ``modules`` (qualified name to module) as ``"<name>.weight"`` to mask, the masks
    themselves rather than copies; modules without one are left out.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> apply_masks(layer, {"weight": torch.tensor([[True, False]])})
        >>> masks_of({"fc": layer})
        {'fc.weight': tensor([[ True, False]])}
    """
    masks = {f"{name}.weight": mask_of(module) for name, module in modules.items()}
    return {name: mask for name, mask in masks.items() if mask is not None}


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` or any module below it carries a mask from :func:`apply_masks`.

    Example:
        >>> is_masked(torch.nn.Linear(2, 1))
        False
    """
    return next(_masked(module), None) is not None


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name to a CPU copy of its bool mask, for every masked parameter of ``model``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False]])})
        >>> get_masks(model)
        {'weight': tensor([[ True, False]])}
    """
    return {
        name: getattr(module, _buffer_name(attr)).to("cpu", copy=True)
        for name, module, attr in _masked(model)
    }


def compute_sparsity(model: nn.Module, param_names: Iterable[str] | None = None) -> dict[str, float]:
    """The real fraction of exact zeros per parameter, counted in the weights (not taken from the masks).

    Args:
        model (`nn.Module`): the model.
        param_names (`Iterable[str]`, *optional*): parameters to measure (a masks dict works too);
            default: the masked ones.

    Returns:
        `dict[str, float]`: ``"overall"`` (zeros over entries of all the parameters together) first, then
        each parameter name.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False], [False, False]])})
        >>> compute_sparsity(model)
        {'overall': 0.75, 'weight': 0.75}
    """
    names = [name for name, _, _ in _masked(model)] if param_names is None else list(param_names)
    if not names:
        raise ValueError("`model` has no masks and `param_names` is empty: name the parameters to measure.")
    counts = grouped_sparsity(model, {name: name for name in names})
    overall = sum(zeros for _, _, zeros in counts.values()) / sum(n for _, n, _ in counts.values())
    return {"overall": overall, **{name: zeros / n for name, (_, n, zeros) in counts.items()}}


def grouped_sparsity(model: nn.Module, groups: Mapping[str, str]) -> dict[str, tuple[int, int, int]]:
    """Exact zero counts in the weights, summed per group: group key to ``(tensors, entries, zeros)``.

    Args:
        model (`nn.Module`): the model.
        groups (`Mapping[str, str]`): parameter name to its group key; groups keep first-seen order.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> apply_masks(model, {"weight": torch.tensor([[True, False], [False, False]])})
        >>> grouped_sparsity(model, {"weight": "linear", "bias": "linear"})
        {'linear': (2, 6, 3)}
    """
    totals: dict[str, list[int]] = {}
    for name, param in _parameters(model, groups).items():
        total = totals.setdefault(groups[name], [0, 0, 0])
        total[0] += 1
        total[1] += param.numel()
        total[2] += int(whole((param == 0).sum()))
    return {group: (tensors, entries, zeros) for group, (tensors, entries, zeros) in totals.items()}
