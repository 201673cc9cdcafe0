"""hf_gradprune: gradient-based structured and weight pruning for the Hugging Face Trainer."""

from ._version import __version__
from .adapters import (
    ArchitectureAdapter,
    Structure,
    find_target_modules,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from .arguments import PruningArguments
from .callback import GradientPruningCallback
from .cards import create_pruning_model_card, save_head_importance_heatmap
from .checkpoint import load_pruned, save_pruned
from .export import export_vanilla
from .flops import block_flops, flops_ratio, select_units_for_flops
from .gates import HeadGates, UnitGates, add_head_gates
from .hub import push_folder_to_hub
from .importance import compute_head_importance, compute_unit_importance, compute_weight_importance
from .lora import mask_lora_updates, merge_and_unload
from .oneshot import prune_in_rounds, prune_to_flops, prune_weights
from .record import PruningRecord
from .rescale import Teacher, capture_targets, capture_teacher, distill_unit_scales, rescale_units
from .selection import (
    compute_weight_masks,
    select_heads_to_prune,
    select_units_to_prune,
    select_units_under_budget,
)
from .surgery import prune_heads, prune_units
from .trainer import PruningTrainer

__all__ = [
    "ArchitectureAdapter",
    "GradientPruningCallback",
    "HeadGates",
    "PruningArguments",
    "PruningRecord",
    "PruningTrainer",
    "Structure",
    "Teacher",
    "UnitGates",
    "__version__",
    "add_head_gates",
    "block_flops",
    "capture_targets",
    "capture_teacher",
    "compute_head_importance",
    "compute_unit_importance",
    "compute_weight_importance",
    "compute_weight_masks",
    "create_pruning_model_card",
    "distill_unit_scales",
    "export_vanilla",
    "find_target_modules",
    "flops_ratio",
    "get_adapter",
    "load_pruned",
    "mask_lora_updates",
    "merge_and_unload",
    "prune_heads",
    "prune_in_rounds",
    "prune_to_flops",
    "prune_units",
    "prune_weights",
    "push_folder_to_hub",
    "register_adapter",
    "rescale_units",
    "save_head_importance_heatmap",
    "save_pruned",
    "select_heads_to_prune",
    "select_units_for_flops",
    "select_units_to_prune",
    "select_units_under_budget",
    "supported_model_types",
]
