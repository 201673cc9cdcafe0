"""One registry from ``config.model_type`` to its :class:`ArchitectureAdapter`."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from .base import ArchitectureAdapter

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Register ``adapter`` for each of its ``model_types``; a type registered twice is refused.

    Example:
        >>> from hf_gradprune.adapters import ArchitectureAdapter, register_adapter
        >>> register_adapter(ArchitectureAdapter(model_types=("my_bert",), layers="encoder.layer",
        ...     attention="attention.self", output="attention.output.dense"))  # doctest: +SKIP
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


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchitectureAdapter:
    """The adapter for a model or config; raises ``ValueError`` listing the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"hf_gradprune does not support model_type {model_type!r}. "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    return _ADAPTERS[model_type]
