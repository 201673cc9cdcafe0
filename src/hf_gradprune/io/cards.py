"""Model cards for pruned models: Hub metadata and the numbers of the pruning (the figures it shows come
from :mod:`hf_gradprune.io.figures`, its tables and sentences from :mod:`hf_gradprune.io.card_tables`).

The card is rendered from the Jinja template ``model_cards/pruned_model.md`` with
``huggingface_hub.ModelCard.from_template``. Nothing of the machine goes into it: a ``base_model`` or
``dataset_name`` that is a local path is described as "a local checkpoint" / "a local dataset" and left
out of the metadata, and pruning arguments holding a path or a token are hidden.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers.modelcard import TASK_MAPPING

from .._version import __version__
from ..core.record import PruningRecord
from .card_tables import (
    RUN_METRICS,
    argument_rows,
    as_texts,
    dataset_entries,
    dataset_text,
    distillation_text,
    evaluation_rows,
    framework_versions,
    hub_id,
    is_local_path,
    is_real,
    model_index_results,
    numeric_metrics,
    sparsity_rows,
    structure_rows,
    training_rows,
)

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "pruned_model.md"
CARD_TAGS = ("pruning", "hf-gradprune")


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


def _check_card_args(
    pruning_args: Any,
    params_before: int | None,
    speedup: float | None,
    heatmap_filename: str | None,
    repo_id: str | None,
) -> None:
    """Check the arguments of :func:`create_pruning_model_card` that need more than a type, before use."""
    if pruning_args is not None and not isinstance(pruning_args, Mapping):
        raise TypeError(
            "`pruning_args` must be a mapping such as `PruningArguments.to_dict()`, "
            f"got {type(pruning_args).__name__}."
        )
    if params_before is not None and (not isinstance(params_before, numbers.Integral) or params_before <= 0):
        raise ValueError(f"`params_before` must be a positive int, got {params_before!r}.")
    if speedup is not None and (not is_real(speedup) or not math.isfinite(speedup) or speedup <= 0):
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
    before = numeric_metrics("eval_before", eval_before)
    pruned = numeric_metrics("eval_pruned", eval_pruned)
    after = numeric_metrics("eval_after", eval_after)
    tasks = as_texts("task", task) or [t for t in [infer_task(model)] if t]
    task = tasks[0] if tasks else None
    datasets = dataset_entries(
        as_texts("dataset_name", dataset_name),
        as_texts("dataset_pretty_name", dataset_pretty_name),
        as_texts("dataset_args", dataset_args),
    )
    languages, extra_tags = as_texts("language", language), as_texts("tags", tags)
    if license is not None and not isinstance(license, str):
        raise TypeError(f"`license` must be a str such as 'apache-2.0', got {license!r}.")
    training = training_rows(hyperparameters, training_results)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    record = PruningRecord.from_config(config)
    structures = structure_rows(model, flops_seq_len)
    sparsity = sparsity_rows(model, pruning_args)
    arguments, arguments_at_default = argument_rows(pruning_args, argument_defaults)

    hub_base = hub_id(base_model)
    hub_datasets = list(dict.fromkeys(entry["id"] for entry in datasets if entry["id"] is not None))
    if model_name is None:
        if repo_id is not None:
            model_name = repo_id.rsplit("/", 1)[-1]
        else:
            model_name = f"{(hub_base or model_type or type(model).__name__).rsplit('/', 1)[-1]}-pruned"
    elif is_local_path(model_name):
        model_name = Path(model_name).name or "pruned-model"

    final = after or pruned
    metrics = [name for name in dict.fromkeys([*final, *before]) if name not in RUN_METRICS]
    eval_results = model_index_results(final, task, datasets)
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
    params_after = sum(p.numel() for p in model.parameters())
    weight_importance = None
    if pruning_args and is_real(pruning_args.get("weight_sparsity")) and pruning_args["weight_sparsity"] > 0:
        weight_importance = pruning_args.get("weight_importance")

    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=model_name,
        base_model_text=base_model_text,
        dataset_text=dataset_text(datasets),
        architecture=type(model).__name__,
        model_type=model_type or "custom",
        transformers_model=config is not None,
        vanilla=vanilla,
        version=__version__,
        record_version=f"hf_gradprune {record.version}" if not record.is_empty() else "no structural pruning",
        framework_versions=framework_versions(),
        pruning_args=arguments,
        arguments_at_default=arguments_at_default,
        weight_importance=weight_importance,
        distillation=distillation_text(pruning_args),
        params_after=f"{params_after:,}",
        params_before=f"{params_before:,}" if params_before else None,
        params_reduction=f"{(params_before - params_after) / params_before:.2%}" if params_before else None,
        evaluation=evaluation_rows(before, pruned, after),
        speedup=f"{speedup:.2f}×" if speedup else None,
        heatmap_filename=heatmap_filename,
        repo_id=repo_id,
        load_id=repo_id or "user/model-name",
        **structures,
        **sparsity,
        **training,
    )
