"""Structural surgery: remove units of any structure (heads, FFN neurons) and whole layers from a model, every
input checked before anything changes, the record, config, weight masks and optimizer kept in step.

Units go by cutting rows and columns (:mod:`hf_gradprune.structured.cutting`), whole layers by deleting
blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core.adapters import HEADS, ArchitectureAdapter, Structure, get_adapter
from ..core.masks import apply_masks, get_masks, note_masks
from ..core.record import PruningRecord
from .cutting import Replacement, cut_masks, cut_structure, drop_from_optimizer, remap_optimizer

#: Config keys holding one entry per layer (transformers' convention), cut with the layers.
PER_LAYER_CONFIG_KEYS = ("layer_types",)
#: The attribute by which transformers' modules know their block's position (the cache slot they use).
LAYER_INDEX_ATTR = "layer_idx"


def _check_not_shared(
    model: nn.Module, adapter: ArchitectureAdapter, structure: Structure, num_layers: int
) -> None:
    """Every layer must own its linears: cutting a module two layers share would cut both (ALBERT-style
    shared layers, or blocks tied by the user)."""
    owners: dict[int, int] = {}
    for layer in range(num_layers):
        for path in [rows.path for rows in structure.rows] + [structure.output]:
            weight = adapter.module(model, layer, path).weight
            first = owners.setdefault(id(weight), layer)
            if first != layer:
                raise ValueError(
                    f"Layers {first} and {layer} share the weights of {path!r}: units of {structure.name!r} "
                    "cannot be removed from one without the other. Untie the layers (copy.deepcopy each "
                    "block) before pruning, or prune weights with masks instead."
                )


def _validate(
    requested: Mapping[int, Sequence[int]],
    record: PruningRecord,
    structure: str,
    num_layers: int,
    num_units: int,
    group: int,
    allow_empty: bool,
    arg: str,
    unit: str,
) -> dict[int, list[int]]:
    """New units to remove per layer; every check runs before anything is cut."""
    new: dict[int, list[int]] = {}
    ignored: list[tuple[int, int]] = []
    for layer, units in requested.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"`{arg}` layer must be an int in [0, {num_layers - 1}], got {layer!r}.")
        for u in units:
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < num_units:
                raise ValueError(
                    f"`{arg}[{layer}]` {unit} must be an int in [0, {num_units - 1}] "
                    f"({num_units} {unit}s in the original model), got {u!r}."
                )
        already = set(record.removed(structure, layer))
        ignored += [(layer, u) for u in units if u in already]
        fresh = sorted(set(units) - already)
        if not fresh:
            continue
        gone = already | set(fresh)
        if len(gone) >= num_units and not allow_empty:
            raise ValueError(
                f"`{arg}[{layer}]` would remove every {unit} of layer {layer} "
                f"({num_units - len(already)} left): keep at least one, or pass `allow_empty=True`."
            )
        groups = sorted({u // group for u in fresh})
        partial = [g for g in groups if any(u not in gone for u in range(g * group, (g + 1) * group))]
        if partial:
            raise ValueError(
                f"`{arg}[{layer}]` must remove whole key/value groups of {group} query heads "
                f"(grouped-query attention); groups {partial} are only partly selected. "
                "Use `select_heads_to_prune(..., num_key_value_heads=...)`."
            )
        new[layer] = fresh
    if ignored:
        warnings.warn(f"{unit.capitalize()}s already removed are ignored: {ignored}.", stacklevel=4)
    return new


def prune_units(
    model: nn.Module,
    units_to_prune: Mapping[str, Mapping[int, Sequence[int]]],
    optimizer: torch.optim.Optimizer | None = None,
    allow_empty: bool = False,
) -> PruningRecord:
    """Remove units of any structure (attention heads, FFN neurons) structurally, in original indices.

    Each structure's row layers lose the rows of removed units and its output layer their columns (see
    :class:`hf_gradprune.core.adapters.Structure`). Under grouped-query attention only whole key/value groups
    of heads may go (``head_dim`` and the query-per-kv ratio stay). Module attributes holding counts are
    updated, weight masks (:func:`hf_gradprune.core.masks.apply_masks`) are cut with their weights, and the
    record in ``model.config`` is extended so that :func:`hf_gradprune.load_pruned` can rebuild the shapes.
    Indices are those of the original model, so calls compose. All input is checked before anything
    changes.

    Args:
        model (`nn.Module`): a model of a registered family.
        units_to_prune (`Mapping[str, Mapping[int, Sequence[int]]]`): structure name (``"heads"``, ``"ffn"``)
            to layer index to original unit indices.
        optimizer (`torch.optim.Optimizer`, *optional*): an optimizer over ``model``'s parameters, remapped
            in place to the new parameters (see :func:`~hf_gradprune.structured.cutting.remap_optimizer`).
        allow_empty (`bool`, *optional*, defaults to `False`): let a layer lose every unit of a structure
            (its layers then have zero rows; the block still runs, adding only the output layer's bias).

    Returns:
        `PruningRecord`: the model's updated record.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> record = prune_units(model, {"heads": {0: [1]}, "ffn": {1: list(range(30))}})
        >>> model.encoder.layer[1].intermediate.dense.out_features, record.pruned_heads
        (7, {0: [1]})
    """
    return _prune_units(model, units_to_prune, optimizer, allow_empty)


def _prune_units(
    model: nn.Module,
    units_to_prune: Mapping[str, Mapping[int, Sequence[int]]],
    optimizer: torch.optim.Optimizer | None,
    allow_empty: bool,
    argument: str | None = None,
) -> PruningRecord:
    """:func:`prune_units`, its errors naming the caller's ``argument`` (default ``units_to_prune[name]``)."""
    adapter = get_adapter(model)
    config = model.config
    record = PruningRecord.from_config(config)
    num_layers = len(adapter.blocks(model))
    plan: list[tuple[Structure, dict[int, list[int]]]] = []
    for name, requested in units_to_prune.items():
        structure = adapter.structure(name)
        if structure.spans_layers:
            raise ValueError(
                f"`units_to_prune[{name!r}]` names whole layers: remove them with `prune_layers`, or all "
                "that a selection chose with `remove_chosen`."
            )
        new = _validate(
            requested,
            record,
            name,
            num_layers,
            adapter.num_units(structure, config),
            adapter.group_size(structure, config),
            allow_empty,
            argument or f"units_to_prune[{name!r}]",
            structure.units_label.removesuffix("s"),  # "attention head", "FFN neuron"
        )
        plan.append((structure, new))
        if new:
            _check_not_shared(model, adapter, structure, num_layers)
    replaced: list[Replacement] = []
    masks, names = get_masks(model), {id(p): n for n, p in model.named_parameters()}
    for structure, new in plan:
        num_units = adapter.num_units(structure, config)
        for layer, fresh in new.items():
            before = record.kept(structure.name, layer, num_units)
            after = [u for u in before if u not in fresh]
            replaced += cut_structure(model, adapter, structure, layer, before, after)
            record.add(structure.name, layer, fresh)
    record.save_to_config(config)
    if masks:
        apply_masks(model, cut_masks(masks, names, replaced))
    if optimizer is not None:
        remap_optimizer(optimizer, replaced)
    return record


def prune_heads(
    model: nn.Module,
    heads_to_prune: Mapping[int, Sequence[int]],
    optimizer: torch.optim.Optimizer | None = None,
) -> PruningRecord:
    """Remove attention heads structurally; indices are those of the original model, so calls compose.

    :func:`prune_units` with the heads: q/k/v lose the rows of removed heads, the output projection their
    columns; under grouped-query attention only whole key/value groups may go.

    Args:
        model (`nn.Module`): a model of a registered family.
        heads_to_prune (`Mapping[int, Sequence[int]]`): layer index to original query-head indices.
        optimizer (`torch.optim.Optimizer`, *optional*): an optimizer over ``model``'s parameters, remapped
            in place to the new parameters (see :func:`~hf_gradprune.structured.cutting.remap_optimizer`).

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
    return _prune_units(model, {HEADS: heads_to_prune}, optimizer, False, "heads_to_prune")


def _check_layers(
    model: nn.Module, adapter: ArchitectureAdapter, layers: Sequence[int], depth: int
) -> list[int]:
    """The positions to remove, sorted; every check runs before anything is cut."""
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence):
        raise TypeError(f"`layers` must be a sequence of layer indices, got {layers!r}.")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
            raise ValueError(f"`layers` must hold ints in [0, {depth - 1}] ({depth} layers), got {layer!r}.")
    positions = sorted(set(layers))
    if len(positions) != len(layers):
        raise ValueError(f"`layers` names a layer twice: {list(layers)}.")
    if len(positions) == depth:
        raise ValueError(f"`layers` would remove all {depth} layers: keep at least one.")
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        raise ValueError(
            "This config describes its layers one by one (`per_layer_config`); removing whole layers from it "
            "is not supported yet: prune heads, FFN neurons or weights instead."
        )
    moving = positions and positions[0] < depth - len(positions)
    fixed = [key for key in adapter.position_keys if getattr(config, key, False)]
    if moving and fixed:
        raise ValueError(
            f"With {fixed[0]}=True each {config.model_type!r} block computes with its position, and removing "
            f"layers {positions} would move the blocks after them: remove only the last layers "
            f"({list(range(depth - len(positions), depth))}), or prune heads or neurons instead."
        )
    return positions


def prune_layers(
    model: nn.Module, layers: Sequence[int], optimizer: torch.optim.Optimizer | None = None
) -> PruningRecord:
    """Remove whole layers (transformer blocks), numbered as the model stands.

    The blocks are deleted and the ones after them move up: their modules learn their new position (the
    ``layer_idx`` of the cache slot they use), the config gets the new depth (``num_hidden_layers`` and the
    per-layer ``layer_types``), and the record notes the removed layers in the original model's numbering
    and moves the per-layer entries of heads and neurons with their layers. A model cut only this way (or
    also the same in every layer) is an ordinary config: plain ``from_pretrained`` loads it. All input is
    checked before anything changes.

    Args:
        model (`nn.Module`): a model of a registered family.
        layers (`Sequence[int]`): positions of the layers to remove.
        optimizer (`torch.optim.Optimizer`, *optional*): an optimizer over ``model``'s parameters; the removed
            layers' parameters and their state leave it, in place.

    Returns:
        `PruningRecord`: the model's updated record.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        ...     num_key_value_heads=2, intermediate_size=37, vocab_size=99))
        >>> prune_layers(model, [1, 2]).removed_layers
        [1, 2]
        >>> model.config.num_hidden_layers, model.model.layers[1].self_attn.layer_idx
        (2, 1)
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    depth = len(blocks)
    positions = _check_layers(model, adapter, layers, depth)
    config = model.config
    record = PruningRecord.from_config(config)
    removed = [param for p in positions for param in blocks[p].parameters()]
    for position in reversed(positions):
        del blocks[position]
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, LAYER_INDEX_ATTR, None), int):
                setattr(module, LAYER_INDEX_ATTR, position)
    config.num_hidden_layers = len(blocks)
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == depth:
            setattr(config, key, [v for i, v in enumerate(values) if i not in positions])
    record.remove_layers(positions, depth)
    record.save_to_config(config)
    note_masks(model)  # masks of the removed layers went with them
    if optimizer is not None:
        drop_from_optimizer(optimizer, removed)
    return PruningRecord.from_config(config)


def remove_chosen(
    model: nn.Module,
    chosen: Mapping[str, Mapping[int, Sequence[int]]],
    optimizer: torch.optim.Optimizer | None = None,
    allow_empty: bool = False,
) -> tuple[dict[str, dict[int, list[int]]], list[int]]:
    """Remove what a selection chose, of any structure of the model's family: the units of the structures of a
    block (:func:`prune_units`), then the whole layers of a structure of whole layers (numbered as the model
    stands, :func:`prune_layers`; a selection takes back the units it chose in a layer it removes).

    Returns:
        `tuple`: the units removed (structure to layer to units, empty entries left out) and the whole layers
        removed, in the original model's numbering.
    """
    adapter = get_adapter(model)
    units: dict[str, dict[int, list[int]]] = {}
    layers: list[int] = []
    for name, per_layer in chosen.items():
        if adapter.structure(name).spans_layers:
            layers.extend(per_layer)
        elif any(per_layer.values()):
            units[name] = {layer: list(u) for layer, u in per_layer.items() if u}
    if units:
        prune_units(model, units, optimizer=optimizer, allow_empty=allow_empty)
    if not layers:
        return units, []
    original = PruningRecord.from_config(model.config).original_layers(len(adapter.blocks(model)))
    prune_layers(model, sorted(set(layers)), optimizer=optimizer)
    return units, sorted(original[layer] for layer in set(layers))


def prune_to_record(model: nn.Module, record: PruningRecord) -> None:
    """Cut ``model`` (unpruned, or pruned part of the way) to the shapes of ``record``: the whole layers and
    the units that ``record`` removed and ``model`` still has. A record that removed nothing structural does
    nothing and asks for no adapter (a model of any family).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> prune_to_record(model, PruningRecord({"heads": {1: [0, 2]}}))
        >>> model.encoder.layer[1].attention.self.key.out_features
        16
    """
    if record.is_empty():
        return
    current = PruningRecord.from_config(model.config)
    if record.removed_layers:
        originals = current.original_layers(len(get_adapter(model).blocks(model)))
        positions = [originals.index(layer) for layer in record.removed_layers if layer in originals]
        if positions:
            current = prune_layers(model, positions)
    missing = {
        name: {
            layer: [unit for unit in units if unit not in current.removed(name, layer)]
            for layer, units in layers.items()
        }
        for name, layers in record.pruned.items()
    }
    missing = {name: {k: v for k, v in layers.items() if v} for name, layers in missing.items()}
    if any(missing.values()):
        prune_units(model, missing, allow_empty=True)
