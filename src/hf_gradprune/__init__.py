"""hf_gradprune: gradient-based structured and weight pruning for the Hugging Face Trainer.

Names are imported from their modules on first use, so ``from hf_gradprune import load_pruned`` loads what
loading needs and not the Trainer and the packages it pulls in (about half the start-up time).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

from ._version import __version__ as __version__

#: The submodule that defines each public name.
_MODULES = {
    "core.adapters": (
        "ArchitectureAdapter",
        "Structure",
        "find_target_modules",
        "get_adapter",
        "register_adapter",
        "supported_model_types",
    ),
    "training.arguments": ("PruningArguments",),
    "training.callback": ("GradientPruningCallback",),
    "io.cards": ("create_pruning_model_card",),
    "io.figures": ("save_head_importance_heatmap",),
    "io.checkpoint": (
        "load_pruned",
        "save_pruned",
    ),
    "weights.criteria": (
        "WeightCriterion",
        "register_weight_criterion",
    ),
    "io.export": ("export_vanilla",),
    "structured.flops": (
        "block_flops",
        "flops_ratio",
        "select_units_for_flops",
    ),
    "structured.gates": (
        "HeadGates",
        "LayerGates",
        "UnitGates",
        "add_head_gates",
    ),
    "io.hub": ("push_folder_to_hub",),
    "structured.importance": (
        "compute_head_importance",
        "compute_layer_importance",
        "compute_unit_importance",
    ),
    "weights.scoring": ("compute_weight_importance",),
    "training.lora": (
        "mask_lora_updates",
        "merge_and_unload",
    ),
    "structured.mask_tuning": (
        "Teacher",
        "capture_teacher",
        "distill_unit_scales",
    ),
    "structured.least_squares_tuning": (
        "capture_targets",
        "rescale_units",
    ),
    "structured.rounds": (
        "prune_in_rounds",
        "prune_layers_by_importance",
        "prune_to_flops",
    ),
    "weights.pruning": ("prune_weights",),
    "core.record": ("PruningRecord",),
    "structured.selection": (
        "select_heads_to_prune",
        "select_units_to_prune",
        "select_units_under_budget",
    ),
    "weights.sparsity": ("compute_weight_masks",),
    "structured.surgery": (
        "prune_heads",
        "prune_layers",
        "prune_units",
    ),
    "training.trainer": ("PruningMixin", "PruningTrainer"),
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


#: Modules that moved into the wings in 0.3, by their 0.2 names: one release of aliases. A module that was
#: split (``importance``, ``oneshot``) answers with the names of all its parts.
_MOVED = {
    "adapters": ("core.adapters",),
    "arguments": ("training.arguments", "core.choices"),
    "blockwise": ("weights.blockwise",),
    "callback": (
        "training.callback",
        "training.run_checks",
        "training.reporting",
        "training.pruning_state",
        "core.batches",
        "weights.pruning",
    ),
    "cards": ("io.cards", "io.card_tables", "io.figures"),
    "checkpoint": ("io.checkpoint", "io.saving", "io.folders", "training.state"),
    "criteria": ("weights.criteria",),
    "distillation": ("training.distillation",),
    "export": ("io.export",),
    "flops": ("structured.flops",),
    "gates": ("structured.gates",),
    "hub": ("io.hub",),
    "importance": ("structured.importance", "weights.scoring", "core.batches"),
    "lora": ("training.lora",),
    "mask_tuning": ("structured.mask_tuning", "structured.least_squares_tuning"),
    "masks": ("core.masks", "core.mask_files"),
    "oneshot": ("structured.rounds", "weights.pruning"),
    "planning": ("training.planning",),
    "reconstruction": ("weights.reconstruction",),
    "record": ("core.record",),
    "selection": ("structured.selection",),
    "sharding": ("core.sharding",),
    "sparsity": ("weights.sparsity",),
    "surgery": ("structured.surgery", "structured.cutting"),
    "trainer": ("training.trainer", "training.checkpoints", "training.publishing"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hf_gradprune.<0.2 name>`` (``hf_gradprune.masks``) at its new place: the module itself
    where it moved whole, a module whose names are those of its parts where it was split."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix(f"{__name__}.")
        if fullname.startswith(f"{__name__}.") and old.split(".")[0] in _MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name.removeprefix(f"{__name__}.")
        head, _, rest = old.partition(".")
        parts = [
            importlib.import_module(f".{new}{'.' + rest if rest else ''}", __name__) for new in _MOVED[head]
        ]
        if len(parts) == 1:
            self._specs[spec.name] = parts[0].__spec__  # the import system sets the alias's: put it back
            return parts[0]
        merged = types.ModuleType(
            spec.name, f"0.2's ``{old}``, now in {', '.join(p.__name__ for p in parts)}."
        )

        def find(name: str) -> Any:
            for part in parts:
                if hasattr(part, name):
                    return getattr(part, name)
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

        merged.__getattr__ = find  # type: ignore[method-assign]
        return merged

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module is the one at its new place, with its own spec again."""
        if module.__spec__.name in self._specs:
            module.__spec__ = self._specs.pop(module.__spec__.name)


sys.meta_path.insert(0, _MovedModules())  # before the path finder, which would load a second copy
