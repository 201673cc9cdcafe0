"""The tables and sentences of the pruning model card (:mod:`hf_gradprune.io.cards`): the arguments, the
evaluation at three points, the ``Trainer``'s sections, the datasets, each structure's units per layer and the
measured sparsity.

Nothing of the machine goes into them: a local path is replaced or described ("a local dataset"), a token
hidden, and a Hub id is kept only when it is not also a path on this machine.
"""

from __future__ import annotations

import importlib.metadata
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from huggingface_hub import EvalResult
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .._version import __version__
from ..core.adapters import Structure, find_adapter, find_target_modules
from ..core.masks import grouped_sparsity
from ..core.record import PruningRecord
from ..structured.flops import block_flops
from .figures import structure_sizes

#: Trainer metrics that describe the run rather than the model: shown in the card, not declared as metrics.
RUN_METRICS = frozenset(
    {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}
)
_HIDDEN = "(hidden)"
_LOCAL_PATH = "(local path)"


def is_local_path(value: str) -> bool:
    """Whether ``value`` names something on this machine rather than something on the Hub."""
    return os.path.isabs(value) or value.startswith(("~", "./", "../", ".\\")) or os.path.exists(value)


def hub_id(value: str | None) -> str | None:
    """``value`` when it is a Hub repository id and not a local path, else ``None``."""
    if value is None or is_local_path(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _cell(value: Any) -> str:
    """``value`` as text for a Markdown table cell, on one line; pipes escaped (GFM, also in code spans)."""
    text = value if isinstance(value, str) else repr(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _scrub(value: Any) -> Any:
    """``value`` with every string that names a local path replaced (lists, tuples and dicts walked)."""
    if isinstance(value, str):
        return _LOCAL_PATH if is_local_path(value) else value
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _scrub(v) for k, v in value.items()}
    return value


def argument_rows(
    pruning_args: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None
) -> tuple[list[tuple[str, str]], int]:
    """``(name, value)`` rows of the arguments table (those set to other than their ``defaults``, when
    given), tokens hidden and local paths replaced; and how many were left out at their defaults."""
    rows, unchanged = [], 0
    for name, value in (pruning_args or {}).items():
        if defaults is not None and name in defaults and defaults[name] == value:
            unchanged += 1
            continue
        shown = _HIDDEN if "token" in str(name).lower() else _scrub(value)
        rows.append((_cell(str(name)), _cell(shown)))
    return rows, unchanged


def distillation_text(pruning_args: Mapping[str, Any] | None) -> str | None:
    """How the training distilled (``--distill_alpha`` above 0), for the method section."""
    args = pruning_args or {}
    alpha = args.get("distill_alpha")
    if not is_real(alpha) or alpha <= 0:
        return None
    teacher = args.get("teacher_model_name_or_path")
    hub_teacher = hub_id(teacher)
    if hub_teacher:
        source = f"[`{hub_teacher}`](https://huggingface.co/{hub_teacher})"
    else:
        source = "a local checkpoint" if teacher else "the model as it was before the first cut"
    parts = f"the teacher's outputs at temperature {args.get('distill_temperature', 2.0)}"
    if args.get("distill_hidden_states"):
        parts += " and each kept layer's hidden states"
    return (
        f"Training after the cut distilled from {source}: the loss was {1 - alpha:g} x the task loss + "
        f"{alpha:g} x the distillation from {parts}."
    )


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metric_name(key: str) -> str:
    return key.removeprefix("eval_")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, numbers.Integral) else f"{value:.4f}"


def numeric_metrics(name: str, metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The real-valued entries of ``metrics`` by metric name; other entries are ignored with a warning."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`{name}` must be a mapping of metric name to number, got {type(metrics).__name__}.")
    ignored = sorted(str(k) for k, v in metrics.items() if not is_real(v))
    if ignored:
        warnings.warn(
            f"`{name}` entries that are not numbers are left out of the card: {ignored}.", stacklevel=3
        )
    return {_metric_name(str(k)): v for k, v in metrics.items() if is_real(v)}


def evaluation_rows(
    before: dict[str, float], pruned: dict[str, float], after: dict[str, float]
) -> list[dict[str, str]]:
    """The evaluation table: each metric before pruning, right after it, after recovery, and the change."""
    rows = []
    for name in dict.fromkeys([*after, *pruned, *before]):
        if name in RUN_METRICS and name != "loss":
            continue
        old, cut, new = before.get(name), pruned.get(name), after.get(name)
        final = new if new is not None else cut
        change = f"{final - old:+.4f}" if old is not None and final is not None else "–"
        rows.append(
            {
                "name": _cell(name),
                "before": "–" if old is None else _number(old),
                "pruned": "–" if cut is None else _number(cut),
                "after": "–" if new is None else _number(new),
                "change": change,
            }
        )
    return rows


def as_texts(name: str, value: Any) -> list[str]:
    """``None``, a str or a sequence of str, as a list of str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return list(value)
    raise TypeError(f"`{name}` must be a str or a list of str, got {value!r}.")


def dataset_entries(ids: list[str], names: list[str], configs: list[str]) -> list[dict[str, str | None]]:
    """One entry per dataset, by position: its Hub id (``None`` when it is a local path), the name shown (a
    local path never) and its configuration. Names without ids are datasets too (``dataset`` of the
    ``Trainer`` alone)."""
    entries = []
    for index in range(max(len(ids), len(names))):
        given = ids[index] if index < len(ids) else None
        name = names[index] if index < len(names) else None
        hub = hub_id(given)
        shown = name if name is not None and not is_local_path(name) else None
        entries.append(
            {
                "id": hub,
                "name": shown or hub,
                "config": configs[index] if index < len(configs) else None,
            }
        )
    return entries


def dataset_text(entries: list[dict[str, Any]]) -> str | None:
    """How the card's first line names the datasets: linked when on the Hub, "a local dataset" otherwise."""
    texts = []
    for entry in entries:
        if entry["id"] is None:
            texts.append(entry["name"] or "a local dataset")
            continue
        link = f"[`{entry['id']}`](https://huggingface.co/datasets/{entry['id']})"
        texts.append(link if entry["name"] == entry["id"] else f"{entry['name']} ({link})")
    return ", ".join(dict.fromkeys(texts)) or None


def model_index_results(
    after: dict[str, float], task: str | None, datasets: list[dict[str, Any]]
) -> list[EvalResult] | None:
    """Model-index entries for the after-pruning quality metrics on each Hub dataset (none without a task)."""
    if task is None:
        return None
    results = [
        EvalResult(
            task_type=task,
            dataset_type=entry["id"],
            dataset_name=entry["name"],
            dataset_config=entry["config"],
            metric_type=name,
            metric_value=value,
        )
        for entry in datasets
        if entry["id"] is not None
        for name, value in after.items()
        if name not in RUN_METRICS and math.isfinite(value)
    ]
    return results or None


def _value_text(value: Any) -> str:
    """A hyperparameter or training-results value as the ``Trainer``'s card shows it (4 decimals at most)."""
    if isinstance(value, float) and math.isfinite(value) and len(repr(value).partition(".")[2]) > 4:
        return _cell(f"{value:.4f}")
    return _cell(value if isinstance(value, str) else str(value))


def training_rows(
    hyperparameters: Mapping[str, Any] | None, training_results: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any]:
    """The ``Trainer``'s own sections: hyperparameters as name/value rows, the training results table."""
    if hyperparameters is not None and not isinstance(hyperparameters, Mapping):
        raise TypeError(f"`hyperparameters` must be a mapping, got {type(hyperparameters).__name__}.")
    results = list(training_results or [])
    if not all(isinstance(row, Mapping) for row in results):
        raise TypeError("`training_results` must be a list of mappings (one row of the table each).")
    columns = list(dict.fromkeys(key for row in results for key in row))
    return {
        "hyperparameters": [
            (_cell(str(k)), _value_text(_scrub(v))) for k, v in (hyperparameters or {}).items()
        ],
        "results_columns": [_cell(str(c)) for c in columns],
        "results_rows": [[_value_text(row.get(c, "–")) for c in columns] for row in results],
    }


def framework_versions() -> list[tuple[str, str]]:
    """The versions a ``Trainer`` card lists, those installed: hf_gradprune, Transformers, PyTorch, Datasets,
    Tokenizers."""
    versions = [("hf_gradprune", __version__), ("Transformers", transformers.__version__)]
    versions.append(("PyTorch", torch.__version__))
    for name, package in (("Datasets", "datasets"), ("Tokenizers", "tokenizers")):
        try:
            versions.append((name, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _structure_summary(
    structure: Structure, sizes: Mapping[str, Any], group: int, record: PruningRecord
) -> dict[str, Any]:
    """One structure's card lines from its ``sizes`` (:func:`~hf_gradprune.io.figures.structure_sizes`): what
    the units are called, how many each layer had and kept, and the table cells of each layer (kept, the
    removed indices when the structure lists them, groups kept)."""
    units, kept = sizes["units"], sizes["kept_units"]
    label = structure.units_label
    header, cells = [f"{_capitalized(label)} kept"], [[f"{len(k)} / {units}"] for k in kept]
    total, kept_total = units * len(kept), sum(sizes["kept"])
    totals = [f"**{kept_total} / {total}**"]
    if structure.list_removed:
        header.append(f"Removed {label}")
        for layer, row in enumerate(cells):
            row.append(", ".join(map(str, record.removed(structure.name, layer))) or "–")
        totals.append(str(total - kept_total))
    groups = units // group
    if group > 1:
        header.append(f"{_capitalized(structure.group_label)} kept")
        groups_kept = [len({unit // group for unit in k}) for k in kept]
        for row, count in zip(cells, groups_kept, strict=True):
            row.append(f"{count} / {groups}")
        totals.append(f"**{sum(groups_kept)} / {groups * len(kept)}**")
    removed = total - kept_total
    return {
        "label": label,
        "title": _capitalized(label),
        "grouped": group > 1,
        "group_label": structure.group_label,
        "before": f"{units} {label}" + (f" sharing {groups} {structure.group_label}" if group > 1 else ""),
        "removed": removed,
        "total": total,
        "removed_pct": f"{removed / total:.2%}" if total else "0.00%",
        "layers_pruned": sum(1 for count in sizes["kept"] if count < units),
        "header": header,
        "cells": cells,
        "totals": totals,
    }


def structure_rows(model: nn.Module, seq_len: int) -> dict[str, Any]:
    """Every structure of the model's family: its units before and after, per layer and in all, the whole
    layers removed, and the block FLOPs."""
    adapter = find_adapter(model)
    if adapter is None:
        return {"structured": False}
    sizes, record = structure_sizes(model), PruningRecord.from_config(model.config)
    structures = [
        _structure_summary(s, sizes[s.name], adapter.group_size(s, model.config), record)
        for s in adapter.structures
    ]
    num_layers = len(adapter.blocks(model))
    table = {
        "header": ["Layer", *(cell for s in structures for cell in s["header"])],
        "rows": [
            [str(layer), *(cell for s in structures for cell in s["cells"][layer])]
            for layer in range(num_layers)
        ],
        "totals": ["**All**", *(cell for s in structures for cell in s["totals"])],
    }
    flops_before, flops_after = block_flops(model, seq_len, original=True), block_flops(model, seq_len)
    return {
        "structured": True,
        "structures": structures,
        "table": table,
        "lists_indices": any(s.list_removed for s in adapter.structures),
        "num_layers": num_layers,
        "layers_removed": record.removed_layers,
        "num_layers_before": num_layers + len(record.removed_layers),
        "flops_seq_len": seq_len,
        "flops_before": f"{flops_before / 1e9:,.2f} GFLOPs",
        "flops_after": f"{flops_after / 1e9:,.2f} GFLOPs",
        "flops_ratio": f"{flops_after / flops_before:.1%}",
    }


def sparsity_rows(model: nn.Module, pruning_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Real zero fraction of the target weights, grouped by their path inside a block (``mlp.up_proj``), or
    by module name for a model of no registered family."""
    patterns = (pruning_args or {}).get("prune_target_modules")
    modules = find_target_modules(model, patterns)
    adapter = find_adapter(model)
    blocks = adapter.blocks(model) if adapter is not None else []
    in_block = {id(sub): path for block in blocks for path, sub in block.named_modules()}
    kinds = {f"{name}.weight": in_block.get(id(m)) or name for name, m in modules.items()}
    counts = grouped_sparsity(model, kinds)
    rows = [
        {"name": kind, "matrices": matrices, "weights": f"{entries:,}", "zero": f"{zeros / entries:.2%}"}
        for kind, (matrices, entries, zeros) in counts.items()
    ]
    entries, zeros = sum(c[1] for c in counts.values()), sum(c[2] for c in counts.values())
    return {
        "sparsity": rows,
        "sparsity_matrices": len(modules),
        "sparsity_weights": f"{entries:,}",
        "overall_sparsity": f"{zeros / entries:.2%}",
    }
