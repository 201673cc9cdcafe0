"""Architecture adapters: one registry, one entry per model family; weight layouts of any model."""

from . import families  # noqa: F401  (registers the built-in families)
from .base import (
    FFN,
    GROUP,
    HEADS,
    LAYERS,
    UNIT,
    ArchitectureAdapter,
    EmptyPart,
    Rows,
    Structure,
    WholeLayers,
    attention_heads,
    ffn_neurons,
    get_submodule,
)
from .layout import (
    PRUNABLE_TYPES,
    input_channel_dim,
    input_dims,
    is_prunable,
    per_input_channel,
    refresh_features,
    weight_dims,
)
from .registry import find_adapter, get_adapter, register_adapter, supported_model_types
from .targets import find_target_modules, weight_input_dims, weight_layer_groups

__all__ = [
    "FFN",
    "GROUP",
    "HEADS",
    "LAYERS",
    "PRUNABLE_TYPES",
    "UNIT",
    "ArchitectureAdapter",
    "EmptyPart",
    "Rows",
    "Structure",
    "WholeLayers",
    "attention_heads",
    "ffn_neurons",
    "find_adapter",
    "find_target_modules",
    "get_adapter",
    "get_submodule",
    "input_channel_dim",
    "input_dims",
    "is_prunable",
    "per_input_channel",
    "refresh_features",
    "register_adapter",
    "supported_model_types",
    "weight_dims",
    "weight_input_dims",
    "weight_layer_groups",
]
