"""The package's wings, and the 0.2 module names that keep working for one release."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

#: Each 0.2 module and one name it held, with the module that holds the name now.
MOVED = [
    ("masks", "get_masks", "core.masks"),
    ("masks", "save_masks", "core.mask_files"),
    ("adapters", "register_adapter", "core.adapters.registry"),
    ("adapters.base", "Structure", "core.adapters.base"),
    ("importance", "batch_loss", "core.batches"),
    ("importance", "compute_unit_importance", "structured.importance"),
    ("importance", "compute_weight_importance", "weights.scoring"),
    ("oneshot", "prune_to_flops", "structured.rounds"),
    ("oneshot", "prune_weights", "weights.pruning"),
    ("arguments", "PruningArguments", "training.arguments"),
    ("arguments", "HEAD_ACCUMULATIONS", "core.choices"),
    ("trainer", "PruningTrainer", "training.trainer"),
    ("trainer", "last_complete_checkpoint", "training.checkpoints"),
    ("trainer", "CARD_FIELDS", "training.publishing"),
    ("callback", "GradientPruningCallback", "training.callback"),
    ("callback", "take_batches", "core.batches"),
    ("callback", "zero_pruned_optimizer_state", "weights.pruning"),
    ("callback", "fsdp_version", "training.run_checks"),
    ("callback", "STATE_FILENAME", "training.pruning_state"),
    ("cards", "create_pruning_model_card", "io.cards"),
    ("cards", "save_head_importance_heatmap", "io.figures"),
    ("cards", "_cell", "io.card_tables"),
    ("surgery", "prune_units", "structured.surgery"),
    ("surgery", "remap_optimizer", "structured.cutting"),
    ("mask_tuning", "distill_unit_scales", "structured.mask_tuning"),
    ("mask_tuning", "rescale_units", "structured.least_squares_tuning"),
    ("checkpoint", "load_pruned", "io.checkpoint"),
    ("checkpoint", "saving_into", "io.saving"),
    ("checkpoint", "read_state_dict", "io.folders"),
    ("checkpoint", "save_state", "training.state"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_a_module_name_of_0_2_gives_the_same_objects(old, name, new):
    assert getattr(importlib.import_module(f"hf_gradprune.{old}"), name) is getattr(
        importlib.import_module(f"hf_gradprune.{new}"), name
    )


def test_a_moved_module_is_one_module_under_both_names_in_a_fresh_process():
    # In a fresh process, the old name first: no second copy of the module (its registry) is made.
    code = (
        "import hf_gradprune.adapters.base as old, hf_gradprune.core.adapters.base as new\n"
        "from hf_gradprune import record\n"
        "import hf_gradprune.core.record as real\n"
        "assert old is new and record is real and real.__spec__.name == 'hf_gradprune.core.record'\n"
        "from hf_gradprune.importance import gate_probe, limited\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_name_of_a_split_module_is_an_attribute_error():
    importance = importlib.import_module("hf_gradprune.importance")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        importance.nothing  # noqa: B018


#: What each wing may import from the package: only the wings below it.
BELOW = {
    "core": set(),
    "structured": {"core"},
    "weights": {"core"},
    "io": {"core", "structured", "weights"},
    "training": {"core", "structured", "weights", "io"},
}


def test_each_wing_imports_only_from_the_wings_below_it():
    import ast
    from pathlib import Path

    package = Path(importlib.import_module("hf_gradprune").__file__).parent
    upward = []
    for wing, allowed in BELOW.items():
        for path in sorted((package / wing).rglob("*.py")):
            depth = len(path.relative_to(package).parts) - 1  # folders below the package
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level > depth and node.module:
                    target = node.module.split(".")[0] if node.level == depth + 1 else None
                    if target in BELOW and target != wing and target not in allowed:
                        upward.append(f"{path.relative_to(package)}:{node.lineno} imports {node.module}")
    assert upward == []
