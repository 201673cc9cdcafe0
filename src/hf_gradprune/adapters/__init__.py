"""Architecture adapters: one registry, one entry per model family."""

from . import families  # noqa: F401  (registers the built-in families)
from .base import ArchitectureAdapter, AttentionParts, weight_dims
from .registry import get_adapter, register_adapter, supported_model_types

__all__ = [
    "ArchitectureAdapter",
    "AttentionParts",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
    "weight_dims",
]
