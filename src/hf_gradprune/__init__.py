"""hf_gradprune: gradient-based head and weight pruning for the Hugging Face Trainer."""

__version__ = "0.1.0"

from .adapters import ArchitectureAdapter, get_adapter, register_adapter, supported_model_types
from .checkpoint import load_pruned
from .gates import HeadGates, add_head_gates
from .importance import compute_head_importance
from .record import PruningRecord
from .selection import select_heads_to_prune
from .surgery import prune_heads

__all__ = [
    "ArchitectureAdapter",
    "HeadGates",
    "PruningRecord",
    "__version__",
    "add_head_gates",
    "compute_head_importance",
    "get_adapter",
    "load_pruned",
    "prune_heads",
    "register_adapter",
    "select_heads_to_prune",
    "supported_model_types",
]
