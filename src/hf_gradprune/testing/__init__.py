"""Helpers for tests and demos: a local Hub-protocol server, real models and data shipped on PyPI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .shipped import load_mnist_5k, load_rotten_tomatoes, minilm_path, shipped_path, smollm2_gguf

if TYPE_CHECKING:
    from .hub import LocalHub

__all__ = ["LocalHub", "load_mnist_5k", "load_rotten_tomatoes", "minilm_path", "shipped_path", "smollm2_gguf"]


def __getattr__(name: str) -> Any:
    # Imported on first use so `python -m hf_gradprune.testing.hub` does not import the module twice.
    if name == "LocalHub":
        from .hub import LocalHub

        return LocalHub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
