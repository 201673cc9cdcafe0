"""Architecture adapters: where each model family keeps its prunable structures.

A *structure* is a kind of unit in every transformer block whose rows leave some linear layers and whose
columns leave one output layer: attention heads (q/k/v rows, output-projection columns) and FFN neurons
(up/gate rows, down columns) are two instances. The adapter declares them as data; gates, importance,
selection, surgery, FLOPs, the pruning record and reload loop over structures and never test a family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .layout import weight_dims

#: A run of rows holding ``width`` rows per unit ("unit") or per key/value group ("group").
UNIT, GROUP = "unit", "group"
HEADS, FFN = "heads", "ffn"
#: Whole layers (transformer blocks): the blocks themselves as units (:class:`WholeLayers`).
LAYERS = "layers"


def config_int(config: PretrainedConfig, value: str | Callable[[PretrainedConfig], int]) -> int:
    """A count a declaration gives as a config key or as a function of the config."""
    return int(value(config) if callable(value) else getattr(config, value))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Return the module at dotted ``path`` below ``root`` (``""`` is ``root`` itself)."""
    return root.get_submodule(path) if path else root


@dataclass(frozen=True)
class Rows:
    """A linear layer whose outputs belong to units.

    Args:
        path (`str`): path from a block to the layer.
        segments (`tuple[str, ...]`, *optional*, defaults to `("unit",)`): the runs its outputs are made of,
            each laid out unit by unit: ``"unit"`` (one unit width per unit) or ``"group"`` (one per
            key/value group). GPT-2's fused ``c_attn`` is ``("unit", "group", "group")``: q, then k, then v.
    """

    path: str
    segments: tuple[str, ...] = (UNIT,)


@dataclass(frozen=True)
class Structure:
    """One kind of prunable unit of a block.

    Args:
        name (`str`): ``"heads"`` or ``"ffn"``; the record stores removed units under ``pruned_<name>``.
        rows (`tuple[Rows, ...]`): the layers whose output rows belong to the units.
        output (`str`): path from a block to the layer whose input columns belong to the units; the
            structure's gate multiplies that input, unit by unit.
        units (`str` or `Callable[[PretrainedConfig], int]`): units per layer in the unpruned model: a
            config key, or a function of the config.
        residual (`str`, *optional*, defaults to `""`): path from a block to the module whose first input is
            the residual stream that is added to ``output``'s output (``""``: the block's own input).
        width (`str` or `Callable[[PretrainedConfig], int]`, *optional*): rows (and output-layer columns)
            of one unit: a config key, or a function of the config; ``None``: one (a neuron).
        groups (`str`, *optional*): config key of the groups units leave by (key/value heads under
            grouped-query attention); ``None``, or a config without the key: each unit leaves alone.
        context_macs (`int`, *optional*, defaults to 0): multiply-adds per unit row for every token of
            context, on top of the weights (attention: 2, the scores and the weighted sum of values).
        label (`str`, *optional*): what the units are called in cards and messages (``"attention heads"``).
        group_label (`str`, *optional*, defaults to `"groups"`): what ``groups`` are called.
        list_removed (`bool`, *optional*, defaults to `False`): cards list the indices of removed units
            (a structure of few units per layer).
        owner (`str`, *optional*, defaults to `""`): path of the module whose attributes follow the count.
        count_attrs (`tuple[str, ...]`, *optional*): ``owner`` attributes holding the number of units.
        width_attrs (`tuple[str, ...]`, *optional*): ``owner`` attributes holding units times unit width.
        empty (`str`, *optional*, defaults to `""`): path of the module that an :class:`EmptyPart` stands in
            for once a layer has lost every unit (``""``: the family's code runs with zero units as it is).
        empty_returns_tuple (`bool`, *optional*, defaults to `False`): that module returns
            ``(output, attention weights)`` rather than a tensor.
        vanilla (`Callable[[PretrainedConfig, int], dict]`, *optional*): the config changes that give every
            layer ``kept`` units with the family's own code (``from_pretrained`` rebuilds them); ``None``
            when the family cannot say it (BERT derives its head size from ``hidden_size``).
        no_vanilla (`str`, *optional*): why, when ``vanilla`` is ``None``: what in the family's config stands
            in the way, for the error that refuses a vanilla export.
    """

    name: str
    rows: tuple[Rows, ...]
    output: str
    units: str | Callable[[PretrainedConfig], int]
    residual: str = ""
    width: str | Callable[[PretrainedConfig], int] | None = None
    groups: str | None = None
    context_macs: int = 0
    label: str = ""
    group_label: str = "groups"
    list_removed: bool = False
    owner: str = ""
    count_attrs: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()
    empty: str = ""
    empty_returns_tuple: bool = False
    vanilla: Callable[[PretrainedConfig, int], dict[str, Any]] | None = None
    no_vanilla: str = "its config has no key for fewer units per layer"

    @property
    def units_label(self) -> str:
        """What the units are called: the declared ``label``, else the name."""
        return self.label or self.name

    def paths(self) -> tuple[str, ...]:
        """Paths of every layer the structure cuts: rows first, then the output layer."""
        return (*(rows.path for rows in self.rows), self.output)

    #: Its units are not whole layers: removing one leaves the layers where they are.
    spans_layers = False

    def score_shape(self, num_layers: int, config: PretrainedConfig) -> tuple[int, ...]:
        """The shape of its scores and gates: ``(num_layers, units per layer)``, in original unit indices."""
        return (num_layers, config_int(config, self.units))


@dataclass(frozen=True)
class WholeLayers:
    """The blocks themselves as a structure: one unit per layer (a layer is a unit of the model, as a head is
    a unit of a block). Every family has it; its scores and gates are ``(num_layers,)`` in the numbering of
    the model as it stands, and removing a unit removes the block with every unit inside it.

    Args:
        name (`str`, *optional*, defaults to `"layers"`): the name flags and scores use.
        label (`str`, *optional*, defaults to `"whole layers"`): what cards and messages call the units.
    """

    name: str = LAYERS
    label: str = "whole layers"
    #: Its units are whole layers: removing one renumbers the layers after it.
    spans_layers = True

    @property
    def units_label(self) -> str:
        """What the units are called."""
        return self.label

    def score_shape(self, num_layers: int, config: PretrainedConfig) -> tuple[int, ...]:
        """The shape of its scores and gates: one per layer as the model stands."""
        return (num_layers,)


class EmptyPart(nn.Module):
    """Stands in for a module whose every unit was removed: its output is the output layer's bias.

    The original's children stay under their names (their tensors have zero rows or columns), so the state
    dict keeps the model's own keys and the output layer's bias still trains.

    Args:
        original (`nn.Module`): the module it replaces (e.g. an attention layer with no head left).
        output (`str`): path from ``original`` to its output layer.
        returns_tuple (`bool`): return ``(output, None)`` as attention layers do.
    """

    def __init__(self, original: nn.Module, output: str, returns_tuple: bool):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.output_path = output
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = get_submodule(self, self.output_path)
        out_features = output.weight.shape[weight_dims(output)[0]]
        result = hidden_states.new_zeros(*hidden_states.shape[:-1], out_features)
        if output.bias is not None:
            result = result + output.bias
        return (result, None) if self.returns_tuple else result

    def extra_repr(self) -> str:
        return f"every unit removed; output: {self.output_path}"


def head_width(config: PretrainedConfig, heads: str = "num_attention_heads") -> int:
    """The width of one attention head: the config's ``head_dim``, else ``hidden_size`` (DistilBERT: ``dim``)
    over the ``heads`` key."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    return int(hidden) // int(getattr(config, heads))


def attention_heads(
    output: str,
    query: str = "",
    key: str = "",
    value: str = "",
    qkv: str = "",
    owner: str = "",
    count_attrs: tuple[str, ...] = (),
    width_attrs: tuple[str, ...] = (),
    units: str = "num_attention_heads",
    groups: str = "num_key_value_heads",
    width: str | Callable[[PretrainedConfig], int] | None = None,
    empty: str = "",
    vanilla: Callable[[PretrainedConfig, int], dict[str, Any]] | None = None,
) -> Structure:
    """The attention-head structure: separate ``query``/``key``/``value`` projections or a fused ``qkv``.

    A head is ``width`` rows wide (default: the config's ``head_dim``, else ``hidden_size`` over the ``units``
    key) and heads leave by the ``groups`` key's key/value groups; each costs two multiply-adds per row and
    token of context (scores and weighted values).
    """
    if width is None:
        width = functools.partial(head_width, heads=units)

    if qkv:
        rows = (Rows(qkv, (UNIT, GROUP, GROUP)),)
    else:
        rows = (Rows(query), Rows(key, (GROUP,)), Rows(value, (GROUP,)))
    return Structure(
        name=HEADS,
        rows=rows,
        output=output,
        units=units,
        width=width,
        groups=groups,
        context_macs=2,
        label="attention heads",
        group_label="key/value heads",
        list_removed=True,
        owner=owner,
        count_attrs=count_attrs,
        width_attrs=width_attrs,
        empty=empty,
        empty_returns_tuple=True,
        vanilla=vanilla,
        no_vanilla="its head size is derived from hidden_size / num_attention_heads",
    )


def ffn_neurons(
    rows: tuple[str, ...],
    output: str,
    residual: str,
    units: str | Callable[[PretrainedConfig], int],
    owner: str = "",
    count_attrs: tuple[str, ...] = (),
    empty: str = "",
    vanilla: Callable[[PretrainedConfig, int], dict[str, Any]] | None = None,
) -> Structure:
    """The FFN-neuron structure: ``rows`` (up, gate) lose outputs, ``output`` (down) loses inputs; a
    ``units`` config key is also how a uniform cut is said (``vanilla``), unless given."""
    if vanilla is None and isinstance(units, str):
        key = units

        def vanilla(config: PretrainedConfig, kept: int) -> dict[str, Any]:
            return {key: kept}

    return Structure(
        name=FFN,
        rows=tuple(Rows(path) for path in rows),
        output=output,
        units=units,
        residual=residual,
        label="FFN neurons",
        owner=owner,
        count_attrs=count_attrs,
        empty=empty,
        vanilla=vanilla,
    )


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Describes one model family: where its blocks are and which structures each block has.

    Args:
        model_types (`tuple[str, ...]`): the ``config.model_type`` values this adapter serves.
        layers (`str`): path from ``model.base_model`` to the ``nn.ModuleList`` of blocks.
        structures (`tuple[Structure, ...]`): the prunable structures of a block, heads first.
        position_keys (`tuple[str, ...]`, *optional*): config keys that, when true, make a block compute
            with its position in the stack (GPT-2's ``scale_attn_by_inverse_layer_idx``): whole layers are
            then removed only from the top, where no block moves.
    """

    model_types: tuple[str, ...]
    layers: str
    structures: tuple[Structure, ...]
    position_keys: tuple[str, ...] = ()
    whole_layers: WholeLayers = WholeLayers()

    @property
    def prunable(self) -> tuple[Structure | WholeLayers, ...]:
        """Every structure of the family: those of a block, then the whole layers."""
        return (*self.structures, self.whole_layers)

    def structure(self, name: str) -> Structure | WholeLayers:
        """The structure called ``name``; a ``ValueError`` lists this family's structures otherwise."""
        for structure in self.prunable:
            if structure.name == name:
                return structure
        raise ValueError(
            f"Model type {self.model_types[0]!r} has no prunable structure {name!r}; it has "
            f"{', '.join(repr(s.name) for s in self.prunable)}."
        )

    def num_units(self, structure: Structure | str, config: PretrainedConfig) -> int:
        """Units of ``structure`` per layer in the unpruned model."""
        structure = self.structure(structure) if isinstance(structure, str) else structure
        return config_int(config, structure.units)

    def unit_width(self, structure: Structure, config: PretrainedConfig) -> int:
        """Rows (and output-layer columns) of one unit, as the structure declares (heads: the head width)."""
        return 1 if structure.width is None else config_int(config, structure.width)

    def group_size(self, structure: Structure, config: PretrainedConfig) -> int:
        """Units that leave together, as the structure declares (query heads per key/value head), else 1."""
        groups = getattr(config, structure.groups, None) if structure.groups else None
        return self.num_units(structure, config) // int(groups) if groups else 1

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks of ``model`` (of a peft model, those of the model it wraps)."""
        inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        return get_submodule(inner.base_model, self.layers)

    def module(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        """The module at ``path`` inside block ``layer`` (of a layer a peft adapter wraps, its base layer)."""
        module = get_submodule(self.blocks(model)[layer], path)
        return getattr(module, "base_layer", module)

    def set_unit_count(self, model: nn.Module, layer: int, structure: Structure, count: int) -> None:
        """Refresh the owner's count and width attributes after surgery (``head_dim`` and ratios stay); with
        no unit left, put an :class:`EmptyPart` in place of ``structure.empty`` when the family needs one."""
        if count == 0 and structure.empty:
            original = self.module(model, layer, structure.empty)
            if not isinstance(original, EmptyPart):
                output = structure.output.removeprefix(f"{structure.empty}.")
                stand_in = EmptyPart(original, output, structure.empty_returns_tuple)
                self.blocks(model)[layer].set_submodule(structure.empty, stand_in)
            return
        owner = self.module(model, layer, structure.owner)
        width = self.unit_width(structure, model.config)
        for attr in structure.count_attrs:
            setattr(owner, attr, count)
        for attr in structure.width_attrs:
            setattr(owner, attr, count * width)
