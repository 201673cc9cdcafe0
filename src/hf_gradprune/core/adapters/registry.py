"""One registry from ``config.model_type`` to its :class:`ArchitectureAdapter`."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register ``adapter`` for each of its ``model_types``; a type registered twice is refused.

    Example:
        >>> from hf_gradprune.core.adapters import ArchitectureAdapter, attention_heads, register_adapter
        >>> register_adapter(ArchitectureAdapter(model_types=("my_bert",), layers="encoder.layer",
        ...     structures=(attention_heads(query="attn.q", key="attn.k", value="attn.v",
        ...                                 output="attn.out"),)))  # doctest: +SKIP
    """
    taken = [t for t in adapter.model_types if t in _ADAPTERS]
    if taken:
        raise ValueError(f"An adapter is already registered for model_type {taken}.")
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The registered ``model_type`` values, sorted."""
    return sorted(_ADAPTERS)


def find_adapter(model_or_config: nn.Module | PretrainedConfig) -> ArchitectureAdapter | None:
    """The adapter for a model or config, or ``None`` for a model of no registered family (any
    ``nn.Module``: weight pruning works on it, structures need an adapter)."""
    config = getattr(model_or_config, "config", model_or_config)
    return _ADAPTERS.get(getattr(config, "model_type", None))


def get_adapter(model_or_config: nn.Module | PretrainedConfig) -> ArchitectureAdapter:
    """The adapter for a model or config; raises ``ValueError`` listing the supported families."""
    adapter = find_adapter(model_or_config)
    if adapter is None:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        raise ValueError(
            f"hf_gradprune does not support model_type {model_type!r} for head and neuron pruning "
            f"(weight pruning works on any model). Supported model types: "
            f"{', '.join(supported_model_types())}; add a family with "
            "`hf_gradprune.register_adapter(ArchitectureAdapter(...))`."
        )
    return adapter
