"""Head gates: one scalar per attention head, applied before the attention output projection.

A gate plays the role ``head_mask`` played in transformers 4: gate 0 removes a head's
contribution exactly as structural removal would, gate 1 leaves the model unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import ArchitectureAdapter, get_adapter
from .record import PruningRecord


def head_layout(model: PreTrainedModel) -> tuple[ArchitectureAdapter, int, int]:
    """``(adapter, num_layers, num_heads)`` of ``model``, heads counted in the original model."""
    adapter = get_adapter(model)
    return adapter, len(adapter.blocks(model)), adapter.num_heads(model.config)


class HeadGates:
    """Gates of shape ``(num_layers, num_heads)`` in original head indices, applied by forward pre-hooks.

    Entries of heads already removed by :func:`hf_gradprune.prune_heads` have no effect.

    Args:
        model (`PreTrainedModel`): a model of a registered family.
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

    def __init__(
        self, model: PreTrainedModel, gates: torch.Tensor | None = None, requires_grad: bool = False
    ):
        adapter, num_layers, num_heads = head_layout(model)
        if gates is None:
            gates = torch.ones(num_layers, num_heads)
        if tuple(gates.shape) != (num_layers, num_heads):
            raise ValueError(
                f"`gates` must have shape ({num_layers}, {num_heads}), got {tuple(gates.shape)}."
            )
        device = next(model.parameters()).device
        self.gates = gates.detach().to(device=device, dtype=torch.float32).requires_grad_(requires_grad)
        record = PruningRecord.from_config(model.config)
        head_dim = adapter.head_dim(model.config)
        self._handles = []
        for layer in range(num_layers):
            kept = torch.tensor(record.kept_heads(layer, num_heads), device=device)
            output = adapter.attention_parts(model, layer).output
            self._handles.append(output.register_forward_pre_hook(self._hook(layer, kept, head_dim)))

    def _hook(self, layer: int, kept: torch.Tensor, head_dim: int):
        def gate_heads(_module: nn.Module, args: tuple) -> tuple:
            hidden, *rest = args
            gate = self.gates[layer].index_select(0, kept).to(hidden.dtype)
            shape = hidden.shape
            gated = (hidden.view(*shape[:-1], len(kept), head_dim) * gate[:, None]).view(shape)
            return (gated, *rest)

        return gate_heads

    def remove(self) -> None:
        """Remove every hook; the model is left exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HeadGates:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def add_head_gates(
    model: PreTrainedModel, gates: torch.Tensor | None = None, requires_grad: bool = False
) -> HeadGates:
    """Attach :class:`HeadGates` to ``model``; use as a context manager or call ``.remove()``."""
    return HeadGates(model, gates=gates, requires_grad=requires_grad)
