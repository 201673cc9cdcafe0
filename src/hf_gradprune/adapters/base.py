"""Architecture adapters: where each model family keeps its attention heads and FFN."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Return the module at dotted ``path`` below ``root`` (``""`` is ``root`` itself)."""
    return root.get_submodule(path) if path else root


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """``(output_dim, input_dim)`` of ``module.weight``: (0, 1) for ``nn.Linear``, (1, 0) for ``Conv1D``."""
    if isinstance(module, Conv1D):
        return 1, 0
    if isinstance(module, nn.Linear):
        return 0, 1
    raise TypeError(
        f"{type(module).__name__} is not a linear layer: only nn.Linear and transformers Conv1D are "
        "supported."
    )


@dataclass(frozen=True)
class AttentionParts:
    """The projections of one attention layer.

    ``query``/``key``/``value`` are ``None`` when the family uses a fused ``qkv`` projection.
    """

    attention: nn.Module
    output: nn.Module
    query: nn.Module | None = None
    key: nn.Module | None = None
    value: nn.Module | None = None
    qkv: nn.Module | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Describes one model family: paths are dotted attribute names.

    Args:
        model_types (`tuple[str, ...]`): the ``config.model_type`` values this adapter serves.
        layers (`str`): path from ``model.base_model`` to the ``nn.ModuleList`` of blocks.
        attention (`str`): path from a block to the module that holds the head-count attributes.
        query, key, value (`str`): paths from a block to the q/k/v projections (``""`` when fused).
        qkv (`str`): path from a block to a fused q/k/v projection (``""`` when separate).
        output (`str`): path from a block to the attention output projection.
        ffn (`tuple[str, ...]`): paths from a block to the FFN's linear layers.
        num_heads_attrs (`tuple[str, ...]`): attention-module attributes holding the query-head count.
        width_attrs (`tuple[str, ...]`): attention-module attributes holding ``num_heads * head_dim``.
        num_heads_key (`str`): config key of the query-head count.
    """

    model_types: tuple[str, ...]
    layers: str
    attention: str
    output: str
    query: str = ""
    key: str = ""
    value: str = ""
    qkv: str = ""
    ffn: tuple[str, ...] = ()
    num_heads_attrs: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()
    num_heads_key: str = "num_attention_heads"

    def num_heads(self, config: PretrainedConfig) -> int:
        """Query heads per layer in the unpruned model."""
        return int(getattr(config, self.num_heads_key))

    def num_key_value_heads(self, config: PretrainedConfig) -> int:
        """Key/value heads per layer in the unpruned model (equal to query heads without GQA)."""
        kv = getattr(config, "num_key_value_heads", None)
        return int(kv) if kv else self.num_heads(config)

    def head_dim(self, config: PretrainedConfig) -> int:
        """Width of one head."""
        explicit = getattr(config, "head_dim", None)
        if explicit:
            return int(explicit)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        return int(hidden) // self.num_heads(config)

    def blocks(self, model: PreTrainedModel) -> nn.ModuleList:
        """The transformer blocks of ``model``."""
        return get_submodule(model.base_model, self.layers)

    def attention_parts(self, model: PreTrainedModel, layer: int) -> AttentionParts:
        """The attention projections of block ``layer``."""
        block = self.blocks(model)[layer]

        def part(path: str) -> nn.Module | None:
            return get_submodule(block, path) if path else None

        return AttentionParts(
            attention=get_submodule(block, self.attention),
            output=get_submodule(block, self.output),
            query=part(self.query),
            key=part(self.key),
            value=part(self.value),
            qkv=part(self.qkv),
        )

    def ffn_modules(self, model: PreTrainedModel, layer: int) -> list[nn.Module]:
        """The FFN linear layers of block ``layer``."""
        block = self.blocks(model)[layer]
        return [get_submodule(block, path) for path in self.ffn]

    def set_head_count(self, attention: nn.Module, num_heads: int, head_dim: int) -> None:
        """Refresh the attention module's own head-count attributes after surgery."""
        for attr in self.num_heads_attrs:
            setattr(attention, attr, num_heads)
        for attr in self.width_attrs:
            setattr(attention, attr, num_heads * head_dim)
