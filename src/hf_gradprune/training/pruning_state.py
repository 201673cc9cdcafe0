"""The pruning state a checkpoint holds beside the model: the weight masks, the schedule position and the
facts of the model card (``pruning_state.json``), and the check that a resumed run prunes what it did."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.mask_files import save_masks
from ..core.masks import MASKS_FILENAME
from .arguments import PruningArguments

STATE_FILENAME = "pruning_state.json"
#: Pruning arguments that may change between a checkpoint and its resumed run: they do not decide what is
#: pruned, only how well it is estimated or how much memory scoring takes (``--scoring_passes``: the same
#: masks in any number of passes).
HARMLESS_ON_RESUME = frozenset({"importance_batches", "measure_speedup", "scoring_passes"})


def write_pruning_state(
    folder: Path, masks: dict[str, torch.Tensor], pruning_args: PruningArguments, facts: dict[str, Any]
) -> None:
    """Write ``masks`` and ``facts`` (with ``pruning_args``) into ``folder``, each file atomically."""
    if masks:
        save_masks(masks, folder / MASKS_FILENAME)
    state = {**facts, "pruning_args": pruning_args.to_dict()}
    partial = folder / f".{STATE_FILENAME}.tmp"
    partial.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(partial, folder / STATE_FILENAME)


def read_pruning_state(folder: Path, pruning_args: PruningArguments) -> dict[str, Any] | None:
    """The facts of ``folder``'s pruning state (``None`` without one), once its pruning arguments are
    checked against ``pruning_args``: a change of what is pruned is a ``ValueError`` naming the flags,
    another change a warning."""
    if not (folder / STATE_FILENAME).is_file():
        return None
    saved = json.loads((folder / STATE_FILENAME).read_text())
    _check_resumed_args(saved.get("pruning_args", {}), pruning_args, folder)
    return saved


def _check_resumed_args(saved: dict[str, Any], pruning_args: PruningArguments, folder: Path) -> None:
    current = pruning_args.to_dict()
    # A flag newer than the checkpoint was at its default then.
    saved = {**PruningArguments.defaults(), **saved}
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    harmful = [k for k in changed if k not in HARMLESS_ON_RESUME]
    if harmful:
        details = "; ".join(f"`--{k}` {saved.get(k)!r} -> {current.get(k)!r}" for k in harmful)
        raise ValueError(
            f"Cannot resume from {folder.name!r} with other pruning arguments: {details}. They change "
            "what is pruned: resume with the checkpoint's arguments, or start a new run."
        )
    if changed:
        details = "; ".join(f"`--{k}` {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        warnings.warn(
            f"Resuming from {folder.name!r} with changed pruning arguments: {details}.", stacklevel=4
        )
