"""hf_gradprune: gradient-based head and weight pruning for the Hugging Face Trainer."""

__version__ = "0.1.0"

from .adapters import ArchitectureAdapter, get_adapter, register_adapter, supported_model_types
from .arguments import PruningArguments
from .callback import GradientPruningCallback
from .cards import create_pruning_model_card, save_head_importance_heatmap
from .checkpoint import load_pruned
from .gates import HeadGates, add_head_gates
from .hub import push_folder_to_hub
from .importance import compute_head_importance
from .record import PruningRecord
from .selection import select_heads_to_prune
from .surgery import prune_heads
from .trainer import PruningTrainer

__all__ = [
    "ArchitectureAdapter",
    "GradientPruningCallback",
    "HeadGates",
    "PruningArguments",
    "PruningRecord",
    "PruningTrainer",
    "__version__",
    "add_head_gates",
    "compute_head_importance",
    "create_pruning_model_card",
    "get_adapter",
    "load_pruned",
    "prune_heads",
    "push_folder_to_hub",
    "register_adapter",
    "save_head_importance_heatmap",
    "select_heads_to_prune",
    "supported_model_types",
]
