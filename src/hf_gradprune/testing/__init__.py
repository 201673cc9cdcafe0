"""Helpers for tests and demos: the real models and data shipped in PyPI packages."""

from .shipped import load_rotten_tomatoes, minilm_path, shipped_path, smollm2_gguf

__all__ = ["load_rotten_tomatoes", "minilm_path", "shipped_path", "smollm2_gguf"]
