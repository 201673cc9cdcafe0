"""hf_gradprune: gradient-based structured and weight pruning for the Hugging Face Trainer.

Names are imported from their modules on first use, so ``from hf_gradprune import load_pruned`` loads what
loading needs and not the Trainer and the packages it pulls in (about half the start-up time).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__ as __version__

#: The submodule that defines each public name.
_MODULES = {
    "adapters": (
        "ArchitectureAdapter",
        "Structure",
        "find_target_modules",
        "get_adapter",
        "register_adapter",
        "supported_model_types",
    ),
    "arguments": ("PruningArguments",),
    "callback": ("GradientPruningCallback",),
    "cards": (
        "create_pruning_model_card",
        "save_head_importance_heatmap",
    ),
    "checkpoint": (
        "load_pruned",
        "save_pruned",
    ),
    "criteria": (
        "WeightCriterion",
        "register_weight_criterion",
    ),
    "export": ("export_vanilla",),
    "flops": (
        "block_flops",
        "flops_ratio",
        "select_units_for_flops",
    ),
    "gates": (
        "HeadGates",
        "LayerGates",
        "UnitGates",
        "add_head_gates",
    ),
    "hub": ("push_folder_to_hub",),
    "importance": (
        "compute_head_importance",
        "compute_layer_importance",
        "compute_unit_importance",
        "compute_weight_importance",
    ),
    "lora": (
        "mask_lora_updates",
        "merge_and_unload",
    ),
    "mask_tuning": (
        "Teacher",
        "capture_targets",
        "capture_teacher",
        "distill_unit_scales",
        "rescale_units",
    ),
    "oneshot": (
        "prune_in_rounds",
        "prune_layers_by_importance",
        "prune_to_flops",
        "prune_weights",
    ),
    "record": ("PruningRecord",),
    "selection": (
        "select_heads_to_prune",
        "select_units_to_prune",
        "select_units_under_budget",
    ),
    "sparsity": ("compute_weight_masks",),
    "surgery": (
        "prune_heads",
        "prune_layers",
        "prune_units",
    ),
    "trainer": ("PruningMixin", "PruningTrainer"),
}
_SOURCE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted([*_SOURCE, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCE})
