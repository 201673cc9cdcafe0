"""hf_gradprune: gradient-based head and weight pruning for the Hugging Face Trainer."""

__version__ = "0.1.0"

from .adapters import ArchitectureAdapter, get_adapter, register_adapter, supported_model_types  # noqa: E402
from .checkpoint import load_pruned  # noqa: E402
from .gates import HeadGates, add_head_gates  # noqa: E402
from .importance import compute_head_importance  # noqa: E402
from .record import PruningRecord  # noqa: E402
from .selection import select_heads_to_prune  # noqa: E402
from .surgery import prune_heads  # noqa: E402

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
