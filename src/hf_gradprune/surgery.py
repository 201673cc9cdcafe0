"""Structural surgery: remove heads by cutting projection rows and columns, in place."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .adapters import get_adapter, weight_dims
from .masks import apply_masks, get_masks
from .record import PruningRecord


class Replacement(NamedTuple):
    """A parameter swapped by surgery: ``new == old.index_select(dim, keep)``."""

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    keep: torch.Tensor


def _replace(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> Replacement:
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return Replacement(old, new, dim, keep)


def cut_linear(module: nn.Module, keep: torch.Tensor, side: str) -> list[Replacement]:
    """Keep only the ``keep`` outputs (``side="out"``) or inputs (``side="in"``) of a linear layer, in place.

    The module object, its hooks, dtype, device and ``requires_grad`` stay; its parameters are new tensors.

    Returns:
        `list[Replacement]`: the swapped parameters, for :func:`remap_optimizer`.
    """
    out_dim, in_dim = weight_dims(module)
    keep = keep.to(module.weight.device)
    replaced = [_replace(module, "weight", out_dim if side == "out" else in_dim, keep)]
    if side == "out" and module.bias is not None:
        replaced.append(_replace(module, "bias", 0, keep))
    if isinstance(module, Conv1D):
        module.nf = module.weight.shape[1]
        module.nx = module.weight.shape[0]
    else:
        module.out_features, module.in_features = module.weight.shape
    return replaced


def remap_optimizer(optimizer: torch.optim.Optimizer, replacements: Sequence[Replacement]) -> None:
    """Point ``optimizer`` at the new parameters; state of kept rows is kept, state of removed rows dropped.

    Works in place on the optimizer (and on an accelerate ``AcceleratedOptimizer`` wrapping one), so a
    learning-rate scheduler holding it stays valid.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    swap = {id(r.old): r for r in replacements}
    for group in inner.param_groups:
        group["params"] = [swap[id(p)].new if id(p) in swap else p for p in group["params"]]
    for r in replacements:
        state = inner.state.pop(r.old, None)
        if state is not None:
            inner.state[r.new] = {
                k: v.index_select(r.dim, r.keep.to(v.device))
                if torch.is_tensor(v) and v.shape == r.old.shape
                else v
                for k, v in state.items()
            }


def _rows(positions: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of the heads at ``positions`` in a projection of ``head_dim``-wide heads."""
    return torch.tensor([p * head_dim + i for p in positions for i in range(head_dim)], dtype=torch.long)


def _validate(
    heads_to_prune: Mapping[int, Sequence[int]],
    record: PruningRecord,
    num_layers: int,
    num_heads: int,
    group: int,
) -> dict[int, list[int]]:
    """New heads to remove per layer; every check runs before anything is cut."""
    new: dict[int, list[int]] = {}
    ignored: list[tuple[int, int]] = []
    for layer, heads in heads_to_prune.items():
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(
                f"`heads_to_prune` layer must be an int in [0, {num_layers - 1}], got {layer!r}."
            )
        for head in heads:
            if not isinstance(head, int) or not 0 <= head < num_heads:
                raise ValueError(
                    f"`heads_to_prune[{layer}]` head must be an int in [0, {num_heads - 1}] "
                    f"({num_heads} heads in the original model), got {head!r}."
                )
        already = set(record.pruned_heads.get(layer, ()))
        ignored += [(layer, h) for h in heads if h in already]
        fresh = sorted(set(heads) - already)
        if not fresh:
            continue
        gone = already | set(fresh)
        if len(gone) >= num_heads:
            raise ValueError(
                f"`heads_to_prune[{layer}]` would remove every head of layer {layer} "
                f"({num_heads - len(already)} left): keep at least one."
            )
        groups = sorted({h // group for h in fresh})
        partial = [g for g in groups if any(h not in gone for h in range(g * group, (g + 1) * group))]
        if partial:
            raise ValueError(
                f"`heads_to_prune[{layer}]` must remove whole key/value groups of {group} query heads "
                f"(grouped-query attention); groups {partial} are only partly selected. "
                "Use `select_heads_to_prune(..., num_key_value_heads=...)`."
            )
        new[layer] = fresh
    if ignored:
        warnings.warn(f"Heads already removed are ignored: {ignored}.", stacklevel=3)
    return new


def prune_heads(
    model: PreTrainedModel,
    heads_to_prune: Mapping[int, Sequence[int]],
    optimizer: torch.optim.Optimizer | None = None,
) -> PruningRecord:
    """Remove attention heads structurally; indices are those of the original model, so calls compose.

    q/k/v lose the rows of removed heads, the output projection their columns. Under grouped-query
    attention only whole key/value groups may go (``head_dim`` and the query-per-kv ratio stay). Module
    attributes holding head counts are updated, weight masks (:func:`hf_gradprune.masks.apply_masks`) are
    cut with their weights, and the record in ``model.config`` is extended so that
    :func:`hf_gradprune.load_pruned` can rebuild the shapes. All input is checked before anything changes.

    Args:
        model (`PreTrainedModel`): a model of a registered family.
        heads_to_prune (`Mapping[int, Sequence[int]]`): layer index to original query-head indices.
        optimizer (`torch.optim.Optimizer`, *optional*): an optimizer over ``model``'s parameters, remapped
            in place to the new parameters (see :func:`remap_optimizer`).

    Returns:
        `PruningRecord`: the model's updated record.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> prune_heads(model, {0: [1]}).pruned_heads
        {0: [1]}
        >>> model.encoder.layer[0].attention.self.query.out_features
        24
    """
    adapter = get_adapter(model)
    config = model.config
    num_heads, num_kv = adapter.num_heads(config), adapter.num_key_value_heads(config)
    group, head_dim = num_heads // num_kv, adapter.head_dim(config)
    record = PruningRecord.from_config(config)
    new = _validate(heads_to_prune, record, len(adapter.blocks(model)), num_heads, group)
    replaced: list[Replacement] = []
    masks, names = get_masks(model), {id(p): n for n, p in model.named_parameters()}
    for layer, fresh in new.items():
        before = record.kept_heads(layer, num_heads)
        after = [h for h in before if h not in fresh]
        q_rows = _rows([before.index(h) for h in after], head_dim)
        kv_before = sorted({h // group for h in before})
        kv_rows = _rows([kv_before.index(g) for g in sorted({h // group for h in after})], head_dim)
        parts = adapter.attention_parts(model, layer)
        if parts.qkv is not None:
            width = len(before) * head_dim
            replaced += cut_linear(
                parts.qkv, torch.cat([q_rows, kv_rows + width, kv_rows + 2 * width]), "out"
            )
        else:
            replaced += cut_linear(parts.query, q_rows, "out")
            replaced += cut_linear(parts.key, kv_rows, "out")
            replaced += cut_linear(parts.value, kv_rows, "out")
        replaced += cut_linear(parts.output, q_rows, "in")
        adapter.set_head_count(parts.attention, len(after), head_dim)
        record.pruned_heads[layer] = sorted(set(record.pruned_heads.get(layer, [])) | set(fresh))
    record.save_to_config(config)
    if masks:
        apply_masks(model, _cut_masks(masks, names, replaced))
    if optimizer is not None:
        remap_optimizer(optimizer, replaced)
    return record


def _cut_masks(
    masks: dict[str, torch.Tensor], names: dict[int, str], replaced: Sequence[Replacement]
) -> dict[str, torch.Tensor]:
    """Weight masks with the rows/columns surgery removed from their parameters removed too."""
    cut = dict(masks)
    for r in replaced:
        name = names[id(r.old)]
        if name in cut:
            cut[name] = cut[name].index_select(r.dim, r.keep.to(cut[name].device))
    return cut
