"""Model cards for pruned models: Hub metadata and the numbers of the pruning (the figures it shows come
from :mod:`hf_gradprune.io.figures`).

The card is rendered from the Jinja template ``model_cards/pruned_model.md`` with
``huggingface_hub.ModelCard.from_template``. Nothing of the machine goes into it: a ``base_model`` or
``dataset_name`` that is a local path is described as "a local checkpoint" / "a local dataset" and left
out of the metadata, and pruning arguments holding a path or a token are hidden.
"""

from __future__ import annotations

import importlib.metadata
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers.modelcard import TASK_MAPPING

from .._version import __version__
from ..core.adapters import Structure, find_adapter, find_target_modules
from ..core.masks import grouped_sparsity
from ..core.record import PruningRecord
from ..structured.flops import block_flops
from .figures import structure_sizes

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "pruned_model.md"
CARD_TAGS = ("pruning", "hf-gradprune")
# Trainer metrics that describe the run rather than the model: shown in the card, not declared as metrics.
RUN_METRICS = frozenset(
    {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}
)
_HIDDEN = "(hidden)"
_LOCAL_PATH = "(local path)"


# --- card ---


def _is_local_path(value: str) -> bool:
    """Whether ``value`` names something on this machine rather than something on the Hub."""
    return os.path.isabs(value) or value.startswith(("~", "./", "../", ".\\")) or os.path.exists(value)


def _hub_id(value: str | None) -> str | None:
    """``value`` when it is a Hub repository id and not a local path, else ``None``."""
    if value is None or _is_local_path(value):
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
        return _LOCAL_PATH if _is_local_path(value) else value
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _scrub(v) for k, v in value.items()}
    return value


def _argument_rows(
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


def _distillation_text(pruning_args: Mapping[str, Any] | None) -> str | None:
    """How the training distilled (``--distill_alpha`` above 0), for the method section."""
    args = pruning_args or {}
    alpha = args.get("distill_alpha")
    if not _real(alpha) or alpha <= 0:
        return None
    teacher = args.get("teacher_model_name_or_path")
    hub_teacher = _hub_id(teacher)
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


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metric_name(key: str) -> str:
    return key.removeprefix("eval_")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, numbers.Integral) else f"{value:.4f}"


def _numeric(name: str, metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The real-valued entries of ``metrics`` by metric name; other entries are ignored with a warning."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`{name}` must be a mapping of metric name to number, got {type(metrics).__name__}.")
    ignored = sorted(str(k) for k, v in metrics.items() if not _real(v))
    if ignored:
        warnings.warn(
            f"`{name}` entries that are not numbers are left out of the card: {ignored}.", stacklevel=3
        )
    return {_metric_name(str(k)): v for k, v in metrics.items() if _real(v)}


def _evaluation_rows(
    before: dict[str, float], pruned: dict[str, float], after: dict[str, float]
) -> list[dict[str, str]]:
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


def _texts(name: str, value: Any) -> list[str]:
    """``None``, a str or a sequence of str, as a list of str."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return list(value)
    raise TypeError(f"`{name}` must be a str or a list of str, got {value!r}.")


def _datasets(ids: list[str], names: list[str], configs: list[str]) -> list[dict[str, str | None]]:
    """One entry per dataset, by position: its Hub id (``None`` when it is a local path), the name shown (a
    local path never) and its configuration. Names without ids are datasets too (``dataset`` of the
    ``Trainer`` alone)."""
    entries = []
    for index in range(max(len(ids), len(names))):
        given = ids[index] if index < len(ids) else None
        name = names[index] if index < len(names) else None
        hub = _hub_id(given)
        shown = name if name is not None and not _is_local_path(name) else None
        entries.append(
            {
                "id": hub,
                "name": shown or hub,
                "config": configs[index] if index < len(configs) else None,
            }
        )
    return entries


def _dataset_text(entries: list[dict[str, Any]]) -> str | None:
    """How the card's first line names the datasets: linked when on the Hub, "a local dataset" otherwise."""
    texts = []
    for entry in entries:
        if entry["id"] is None:
            texts.append(entry["name"] or "a local dataset")
            continue
        link = f"[`{entry['id']}`](https://huggingface.co/datasets/{entry['id']})"
        texts.append(link if entry["name"] == entry["id"] else f"{entry['name']} ({link})")
    return ", ".join(dict.fromkeys(texts)) or None


def _eval_results(
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


def _training_rows(
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


def _framework_versions() -> list[tuple[str, str]]:
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


def infer_task(model: nn.Module) -> str | None:
    """The Hub task of ``model``'s head (``text-generation`` for a causal LM, ``text-classification``,
    ``token-classification``, ``question-answering``, ``image-classification`` ...), ``None`` when unknown.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> infer_task(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4)))
        'text-generation'
    """
    name = type(model).__name__
    return next((task for task, mapping in TASK_MAPPING.items() if name in set(mapping.values())), None)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _structure_summary(
    structure: Structure, sizes: Mapping[str, Any], group: int, record: PruningRecord
) -> dict[str, Any]:
    """One structure's card lines from its ``sizes`` (:func:`_structure_sizes`): what the units are called,
    how many each layer had and kept, and the table cells of each layer (kept, the removed indices when the
    structure lists them, groups kept)."""
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


def _structure_rows(model: nn.Module, seq_len: int) -> dict[str, Any]:
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


def _sparsity_rows(model: nn.Module, pruning_args: Mapping[str, Any] | None) -> dict[str, Any]:
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


def _check_card_args(
    pruning_args: Any,
    params_before: int | None,
    speedup: float | None,
    heatmap_filename: str | None,
    repo_id: str | None,
) -> None:
    if pruning_args is not None and not isinstance(pruning_args, Mapping):
        raise TypeError(
            "`pruning_args` must be a mapping such as `PruningArguments.to_dict()`, "
            f"got {type(pruning_args).__name__}."
        )
    if params_before is not None and (not isinstance(params_before, numbers.Integral) or params_before <= 0):
        raise ValueError(f"`params_before` must be a positive int, got {params_before!r}.")
    if speedup is not None and (not _real(speedup) or not math.isfinite(speedup) or speedup <= 0):
        raise ValueError(f"`speedup` must be a positive finite ratio (e.g. 1.4), got {speedup!r}.")
    if heatmap_filename is not None:
        relative = PurePosixPath(heatmap_filename)
        if (
            not heatmap_filename
            or relative.is_absolute()
            or ".." in relative.parts
            or "\\" in heatmap_filename
        ):
            raise ValueError(
                "`heatmap_filename` must be a relative file name inside the repository, such as "
                f"'head_importance.png', got {heatmap_filename!r}."
            )
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(f"`repo_id` must be a Hub repository id such as 'user/name': {error}") from None


def create_pruning_model_card(
    model: nn.Module,
    *,
    base_model: str | None = None,
    pruning_args: Mapping[str, Any] | None = None,
    params_before: int | None = None,
    eval_before: Mapping[str, float] | None = None,
    eval_pruned: Mapping[str, float] | None = None,
    eval_after: Mapping[str, float] | None = None,
    dataset_name: str | Sequence[str] | None = None,
    task: str | Sequence[str] | None = None,
    speedup: float | None = None,
    heatmap_filename: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    flops_seq_len: int = 128,
    vanilla: bool = False,
    dataset_pretty_name: str | Sequence[str] | None = None,
    dataset_args: str | Sequence[str] | None = None,
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    training_results: Sequence[Mapping[str, Any]] | None = None,
    argument_defaults: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a pruned model: Hub metadata and what was pruned, with the real numbers.

    The metadata (``library_name``, ``base_model``, ``tags``, ``datasets``, ``metrics``, ``pipeline_tag`` and
    a ``model-index`` of the final results) is built with ``huggingface_hub.ModelCardData``. The body lists
    the heads and FFN neurons kept per layer (from the pruning record in ``model.config``), the block FLOPs
    before and after, the parameters before and after, the measured fraction of zero weights per module
    type, the evaluation at three points (before pruning, right after it, after the recovery fine-tune: the
    cost of pruning is not hidden by the extra training), the speed-up and the heatmap when given, and a
    snippet that loads the model with :func:`hf_gradprune.load_pruned`. Any ``nn.Module`` gets a card
    (without the structure tables when it is of no registered family). No local path, token or user name of
    the machine ends up in the card.

    Args:
        model (`nn.Module`): the pruned model.
        base_model (`str`, *optional*): Hub id of the model that was pruned. A local path is not written:
            the card says "a local checkpoint" and the metadata has no ``base_model``.
        pruning_args (`Mapping[str, Any]`, *optional*): the arguments used, e.g.
            ``PruningArguments.to_dict()``; keys holding a token are hidden and local paths replaced.
        params_before (`int`, *optional*): parameters of the model before pruning.
        eval_before (`Mapping[str, float]`, *optional*): metrics before pruning, e.g.
            ``{"eval_accuracy": 0.81}``; the ``eval_`` prefix is dropped.
        eval_pruned (`Mapping[str, float]`, *optional*): metrics right after pruning, before any more
            training.
        eval_after (`Mapping[str, float]`, *optional*): metrics after the recovery fine-tune; they (or else
            ``eval_pruned``) make the ``model-index`` (all but loss, runtime and throughput) when
            ``dataset_name`` is a Hub dataset id.
        dataset_name (`str` or `list[str]`, *optional*): Hub id(s) of the training and evaluation datasets,
            e.g. ``"rotten_tomatoes"`` (the ``Trainer``'s ``dataset_tags``); a local path is "a local
            dataset".
        task (`str` or `list[str]`, *optional*): the Hub task(s); the first is the ``pipeline_tag`` and the
            model-index task, all are tags; by default the task of the model's head (:func:`infer_task`),
            none when unknown.
        speedup (`float`, *optional*): measured inference speed-up of the pruned over the original model.
        heatmap_filename (`str`, *optional*): relative name of the heatmap PNG in the repository, e.g.
            ``"head_importance.png"`` (see :func:`save_head_importance_heatmap`).
        repo_id (`str`, *optional*): the repository the card is for, used in the loading snippet.
        model_name (`str`, *optional*): title and model-index name; defaults to the name part of
            ``repo_id``, else ``<base model name>-pruned``.
        flops_seq_len (`int`, *optional*, defaults to 128): the sequence length of the FLOPs counts.
        vanilla (`bool`, *optional*, defaults to `False`): the card of a vanilla export
            (:func:`hf_gradprune.export_vanilla`): "How to load" is plain transformers.
        dataset_pretty_name (`str` or `list[str]`, *optional*): the name shown for each dataset, by position
            (``"GLUE MRPC"``; the ``Trainer``'s ``dataset``); defaults to the id.
        dataset_args (`str` or `list[str]`, *optional*): each dataset's configuration, by position
            (``"mrpc"``), for the model-index.
        language (`str` or `list[str]`, *optional*): the language(s) of the model, e.g. ``"en"``.
        license (`str`, *optional*): the license id, e.g. ``"apache-2.0"``.
        tags (`str` or `list[str]`, *optional*): more tags, after ``pruning`` and ``hf-gradprune``.
        hyperparameters (`Mapping[str, Any]`, *optional*): the training hyperparameters section, as the
            ``Trainer``'s card lists them (``transformers.modelcard.extract_hyperparameters_from_trainer``).
        training_results (`Sequence[Mapping[str, Any]]`, *optional*): the training results table, one row per
            evaluation (``transformers.modelcard.parse_log_history(log_history)[1]``).
        argument_defaults (`Mapping[str, Any]`, *optional*): the defaults of ``pruning_args``
            (``PruningArguments.defaults()``): the table lists the arguments set to something else, and one
            line counts the rest. ``None``: every argument is listed.

    Returns:
        `huggingface_hub.ModelCard`: save it as ``README.md`` in the model folder with ``card.save(path)``.

    Raises:
        ValueError: a non-positive ``params_before`` or ``speedup``, an absolute or parent-relative
            ``heatmap_filename``, or an invalid ``repo_id``.
        TypeError: ``pruning_args`` is not a mapping (pass ``PruningArguments.to_dict()``), or a text field
            that is not a str or a list of str.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import prune_heads
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> before = model.num_parameters()
        >>> _ = prune_heads(model, {0: [1]})
        >>> card = create_pruning_model_card(model, base_model="google-bert/bert-base-uncased",
        ...     params_before=before, eval_after={"eval_accuracy": 0.8}, dataset_name="rotten_tomatoes",
        ...     repo_id="user/bert-pruned")
        >>> card.data.base_model, card.data.eval_results[0].metric_value, card.data.pipeline_tag
        ('google-bert/bert-base-uncased', 0.8, 'text-classification')
        >>> "| 0 | 3 / 4 | 1 | 37 / 37 |" in card.text
        True
    """
    _check_card_args(pruning_args, params_before, speedup, heatmap_filename, repo_id)
    before = _numeric("eval_before", eval_before)
    pruned = _numeric("eval_pruned", eval_pruned)
    after = _numeric("eval_after", eval_after)
    tasks = _texts("task", task) or [t for t in [infer_task(model)] if t]
    task = tasks[0] if tasks else None
    datasets = _datasets(
        _texts("dataset_name", dataset_name),
        _texts("dataset_pretty_name", dataset_pretty_name),
        _texts("dataset_args", dataset_args),
    )
    languages, extra_tags = _texts("language", language), _texts("tags", tags)
    if license is not None and not isinstance(license, str):
        raise TypeError(f"`license` must be a str such as 'apache-2.0', got {license!r}.")
    training = _training_rows(hyperparameters, training_results)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    record = PruningRecord.from_config(config)
    structures = _structure_rows(model, flops_seq_len)
    sparsity = _sparsity_rows(model, pruning_args)
    arguments, arguments_at_default = _argument_rows(pruning_args, argument_defaults)

    hub_base = _hub_id(base_model)
    hub_datasets = list(dict.fromkeys(entry["id"] for entry in datasets if entry["id"] is not None))
    if model_name is None:
        if repo_id is not None:
            model_name = repo_id.rsplit("/", 1)[-1]
        else:
            model_name = f"{(hub_base or model_type or type(model).__name__).rsplit('/', 1)[-1]}-pruned"
    elif _is_local_path(model_name):
        model_name = Path(model_name).name or "pruned-model"

    final = after or pruned
    metrics = [name for name in dict.fromkeys([*final, *before]) if name not in RUN_METRICS]
    eval_results = _eval_results(final, task, datasets)
    card_data = ModelCardData(
        language=languages or None,
        license=license,
        library_name="transformers" if config is not None else None,
        base_model=hub_base,
        tags=list(dict.fromkeys([*CARD_TAGS, *tasks, *extra_tags])),
        datasets=hub_datasets or None,
        metrics=metrics or None,
        pipeline_tag=task,
        # The name goes into the metadata only as the model-index name.
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )

    if hub_base:
        base_model_text = f"[`{hub_base}`](https://huggingface.co/{hub_base})"
    else:
        base_model_text = "a local checkpoint" if base_model else None
    dataset_text = _dataset_text(datasets)
    params_after = sum(p.numel() for p in model.parameters())
    weight_importance = None
    if pruning_args and _real(pruning_args.get("weight_sparsity")) and pruning_args["weight_sparsity"] > 0:
        weight_importance = pruning_args.get("weight_importance")

    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        base_model_text=base_model_text,
        dataset_text=dataset_text,
        architecture=type(model).__name__,
        model_type=model_type or "custom",
        transformers_model=config is not None,
        vanilla=vanilla,
        version=__version__,
        record_version=f"hf_gradprune {record.version}" if not record.is_empty() else "no structural pruning",
        framework_versions=_framework_versions(),
        pruning_args=arguments,
        arguments_at_default=arguments_at_default,
        weight_importance=weight_importance,
        distillation=_distillation_text(pruning_args),
        params_after=f"{params_after:,}",
        params_before=f"{params_before:,}" if params_before else None,
        params_reduction=f"{(params_before - params_after) / params_before:.2%}" if params_before else None,
        evaluation=_evaluation_rows(before, pruned, after),
        speedup=f"{speedup:.2f}×" if speedup else None,
        heatmap_filename=heatmap_filename,
        repo_id=repo_id,
        load_id=repo_id or "user/model-name",
        **structures,
        **sparsity,
        **training,
    )
