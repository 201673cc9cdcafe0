"""Gates: one scalar per unit of a structure (attention head, FFN neuron), applied before its output layer,
and one per layer on what the whole block adds to the residual stream.

A head gate plays the role ``head_mask`` played in transformers 4: gate 0 removes a unit's contribution
exactly as structural removal would, gate 1 leaves the model unchanged. The gate sits on the input of the
structure's output layer (the attention output projection, the FFN down projection), where each unit owns
one run of ``unit_width`` columns. A layer gate turns a block's output ``y`` on input ``x`` into
``x + gate · (y − x)``: gate 0 is the model without that block.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.adapters import HEADS, Structure, WholeLayers, get_adapter
from ..core.record import PruningRecord

if TYPE_CHECKING:
    from typing_extensions import Self


class _Hooked:
    """Hooks that a ``with`` block or :meth:`remove` takes off the model again."""

    _handles: list

    def remove(self) -> None:
        """Remove every hook; the model is left exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class UnitGates(_Hooked):
    """Gates of shape ``(num_layers, num_units)`` of one structure, in original unit indices.

    Entries of units already removed by surgery have no effect.

    Args:
        model (`nn.Module`): a model of a registered family.
        structure (`str`, *optional*, defaults to `"heads"`): ``"heads"`` or ``"ffn"``.
        gates (`torch.Tensor`, *optional*): initial values; defaults to ones (float32).
        requires_grad (`bool`, *optional*, defaults to `False`): track gradients of the gates.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import torch
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99)).eval()
        >>> with UnitGates(model, "ffn") as gates:
        ...     gates.gates[0, :10] = 0.0  # silence ten neurons of layer 0
        ...     out = model(torch.tensor([[1, 2, 3]])).last_hidden_state
        >>> tuple(gates.gates.shape)
        (2, 37)
    """

    def __init__(
        self,
        model: nn.Module,
        structure: str = HEADS,
        gates: torch.Tensor | None = None,
        requires_grad: bool = False,
    ):
        adapter = get_adapter(model)
        self.structure = adapter.structure(structure)
        num_layers = len(adapter.blocks(model))
        num_units = adapter.num_units(self.structure, model.config)
        if gates is None:
            gates = torch.ones(num_layers, num_units)
        if tuple(gates.shape) != (num_layers, num_units):
            raise ValueError(
                f"`gates` must have shape ({num_layers}, {num_units}) for {structure!r}, "
                f"got {tuple(gates.shape)}."
            )
        device = next(model.parameters()).device
        self.gates = gates.detach().to(device=device, dtype=torch.float32).requires_grad_(requires_grad)
        record = PruningRecord.from_config(model.config)
        width = adapter.unit_width(self.structure, model.config)
        self._handles = []
        for layer in range(num_layers):
            kept = torch.tensor(record.kept(structure, layer, num_units), device=device, dtype=torch.long)
            output = adapter.module(model, layer, self.structure.output)
            self._handles.append(output.register_forward_pre_hook(self._hook(layer, kept, width)))

    def _hook(self, layer: int, kept: torch.Tensor, width: int):
        def gate_units(_module: nn.Module, args: tuple) -> tuple:
            hidden, *rest = args
            gate = self.gates[layer].index_select(0, kept).to(hidden.dtype)
            shape = hidden.shape
            gated = (hidden.reshape(*shape[:-1], len(kept), width) * gate[:, None]).reshape(shape)
            return (gated, *rest)

        return gate_units


class HeadGates(UnitGates):
    """:class:`UnitGates` of the attention heads: shape ``(num_layers, num_heads)``.

    Args:
        model (`nn.Module`): a model of a registered family.
        gates (`torch.Tensor`, *optional*): initial values; defaults to ones (float32).
        requires_grad (`bool`, *optional*, defaults to `False`): track gradients of the gates.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import torch
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99)).eval()
        >>> with HeadGates(model) as gates:
        ...     gates.gates[0, 1] = 0.0  # silence head 1 of layer 0
        ...     out = model(torch.tensor([[1, 2, 3]])).last_hidden_state
        >>> tuple(out.shape)
        (1, 3, 32)
    """

    def __init__(self, model: nn.Module, gates: torch.Tensor | None = None, requires_grad: bool = False):
        super().__init__(model, HEADS, gates=gates, requires_grad=requires_grad)


def add_head_gates(
    model: nn.Module, gates: torch.Tensor | None = None, requires_grad: bool = False
) -> HeadGates:
    """Attach :class:`HeadGates` to ``model``; use as a context manager or call ``.remove()``."""
    return HeadGates(model, gates=gates, requires_grad=requires_grad)


class LayerGates(_Hooked):
    """One gate per layer, ``(num_layers,)``, on what each block adds to its input (see the module docstring).

    Args:
        model (`nn.Module`): a model of a registered family.
        gates (`torch.Tensor`, *optional*): initial values; defaults to ones (float32).
        requires_grad (`bool`, *optional*, defaults to `False`): track gradients of the gates.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import torch
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99)).eval()
        >>> with LayerGates(model) as gates:
        ...     gates.gates[1] = 0.0  # the model without its last layer
        ...     out = model(torch.tensor([[1, 2, 3]])).last_hidden_state
        >>> tuple(gates.gates.shape)
        (2,)
    """

    def __init__(self, model: nn.Module, gates: torch.Tensor | None = None, requires_grad: bool = False):
        blocks = get_adapter(model).blocks(model)
        if gates is None:
            gates = torch.ones(len(blocks))
        if tuple(gates.shape) != (len(blocks),):
            raise ValueError(f"`gates` must have shape ({len(blocks)},), got {tuple(gates.shape)}.")
        device = next(model.parameters()).device
        self.gates = gates.detach().to(device=device, dtype=torch.float32).requires_grad_(requires_grad)
        self._handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, layer: int):
        def gate_block(module: nn.Module, args: tuple, output: Any) -> Any:
            if not args:
                raise TypeError(
                    f"{type(module).__name__} was called without positional hidden states; layer gates read "
                    "a block's input from its first positional argument."
                )
            hidden = args[0]
            out = output[0] if isinstance(output, tuple) else output
            gated = hidden + self.gates[layer].to(out.dtype) * (out - hidden)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        return gate_block


@functools.singledispatch
def gates_for(structure: Any, model: nn.Module, requires_grad: bool = False) -> _Hooked:
    """All-ones gates of ``structure`` (a declaration of the model's adapter) on ``model``: the gates of its
    kind (:class:`UnitGates` for units of a block, :class:`LayerGates` for whole layers). A new kind of
    structure registers its gates here (``@gates_for.register``)."""
    raise TypeError(f"No gates for a structure of kind {type(structure).__name__}.")


@gates_for.register
def _(structure: Structure, model: nn.Module, requires_grad: bool = False) -> UnitGates:
    return UnitGates(model, structure.name, requires_grad=requires_grad)


@gates_for.register
def _(structure: WholeLayers, model: nn.Module, requires_grad: bool = False) -> LayerGates:
    return LayerGates(model, requires_grad=requires_grad)
