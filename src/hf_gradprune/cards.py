"""Model cards for pruned models: Hub metadata, the numbers of the pruning, a head-importance heatmap.

The card is rendered from the Jinja template ``model_cards/pruned_model.md`` with
``huggingface_hub.ModelCard.from_template``. Nothing of the machine goes into it: a ``base_model`` or
``dataset_name`` that is a local path is described as "a local checkpoint" / "a local dataset" and left
out of the metadata, and pruning arguments holding a path or a token are hidden.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import matplotlib
import numpy as np
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from transformers import PreTrainedModel

from . import __version__
from .adapters import get_adapter
from .importance import target_linear_modules
from .masks import grouped_sparsity
from .record import PruningRecord

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "pruned_model.md"
CARD_TAGS = ("pruning", "hf-gradprune")
# Trainer metrics that describe the run rather than the model: shown in the card, not declared as metrics.
RUN_METRICS = frozenset(
    {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}
)
REMOVED_COLOR = "lightgrey"
_HIDDEN = "(hidden)"
_LOCAL_PATH = "(local path)"


# --- heatmap ---


def _importance_array(importance: torch.Tensor) -> np.ndarray:
    if not isinstance(importance, torch.Tensor):
        raise TypeError(
            "`importance` must be a torch.Tensor of shape (num_layers, num_heads), "
            f"got {type(importance).__name__}."
        )
    if importance.dim() != 2 or importance.numel() == 0:
        raise ValueError(
            "`importance` must be a non-empty (num_layers, num_heads) tensor, "
            f"got shape {tuple(importance.shape)}."
        )
    return importance.detach().to("cpu", torch.float64).numpy()


def head_importance_figure(importance: torch.Tensor, title: str = "Head importance") -> Figure:
    """A heatmap of head importance: layers on the y axis, heads on the x axis, removed (NaN) heads grey.

    The figure is built on its own Agg canvas; no pyplot state or global backend is touched.

    Args:
        importance (`torch.Tensor`): ``(num_layers, num_heads)`` scores in original head indices, NaN for
            removed heads, as from :func:`hf_gradprune.compute_head_importance`.
        title (`str`, *optional*, defaults to `"Head importance"`): the figure title.

    Returns:
        `matplotlib.figure.Figure`: the figure, ready for ``savefig`` or TensorBoard's ``add_figure``.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, float("nan"), 0.5], [0.3, 0.2, 0.9]])
        >>> figure = head_importance_figure(scores)
        >>> figure.axes[0].get_xlabel(), figure.axes[0].get_ylabel()
        ('head', 'layer')
    """
    scores = _importance_array(importance)
    num_layers, num_heads = scores.shape
    size = (max(4.5, 0.45 * num_heads + 2.5), max(3.0, 0.35 * num_layers + 1.8))
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad=REMOVED_COLOR)
    image = axes.imshow(
        np.ma.masked_invalid(scores),
        cmap=colormap,
        vmin=low,
        vmax=high,
        aspect="auto",
        interpolation="nearest",
        origin="upper",
    )
    axes.set_title(title)
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    for axis, count in ((axes.xaxis, num_heads), (axes.yaxis, num_layers)):
        axis.set_major_locator(MaxNLocator(nbins=min(count, 16), integer=True))
    figure.colorbar(image, ax=axes, label="importance (grey: removed)")
    if np.isnan(scores).any():
        removed = Patch(facecolor=REMOVED_COLOR, edgecolor="black", label="removed head")
        figure.legend(handles=[removed], loc="outside lower right", frameon=False)
    return figure


def save_head_importance_heatmap(
    importance: torch.Tensor, path: str | os.PathLike, title: str = "Head importance"
) -> Path:
    """Write the heatmap of :func:`head_importance_figure` to a PNG file, never half-written.

    The PNG goes to a temporary file in the same folder first and is moved into place with ``os.replace``.

    Args:
        importance (`torch.Tensor`): ``(num_layers, num_heads)`` scores, NaN for removed heads.
        path (`str` or `os.PathLike`): the PNG file to write; its folder must exist.
        title (`str`, *optional*, defaults to `"Head importance"`): the figure title.

    Returns:
        `Path`: ``path``.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     png = save_head_importance_heatmap(torch.rand(2, 4), Path(folder) / "head_importance.png")
        ...     png.read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    path = Path(path)
    figure = head_importance_figure(importance, title)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(partial, format="png", dpi=120)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


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


def _argument_rows(pruning_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(name, value)`` rows of the arguments table: tokens hidden, local paths replaced."""
    rows = []
    for name, value in (pruning_args or {}).items():
        shown = _HIDDEN if "token" in str(name).lower() else _scrub(value)
        rows.append((_cell(str(name)), _cell(shown)))
    return rows


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


def _evaluation_rows(before: dict[str, float], after: dict[str, float]) -> list[dict[str, str]]:
    rows = []
    for name in dict.fromkeys([*after, *before]):
        if name in RUN_METRICS and name != "loss":
            continue
        old, new = before.get(name), after.get(name)
        change = f"{new - old:+.4f}" if old is not None and new is not None else "–"
        rows.append(
            {
                "name": _cell(name),
                "before": "–" if old is None else _number(old),
                "after": "–" if new is None else _number(new),
                "change": change,
            }
        )
    return rows


def _eval_results(after: dict[str, float], task: str, dataset: str | None) -> list[EvalResult] | None:
    """Model-index entries for the after-pruning quality metrics (none without a Hub dataset)."""
    if dataset is None:
        return None
    results = [
        EvalResult(
            task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=name, metric_value=value
        )
        for name, value in after.items()
        if name not in RUN_METRICS and math.isfinite(value)
    ]
    return results or None


def _layer_rows(model: PreTrainedModel, record: PruningRecord) -> dict[str, Any]:
    """Per-layer kept heads (and key/value heads under grouped-query attention) from the record."""
    adapter = get_adapter(model)
    config = model.config
    num_heads, num_kv = adapter.num_heads(config), adapter.num_key_value_heads(config)
    group = num_heads // num_kv
    num_layers = len(adapter.blocks(model))
    rows = []
    for layer in range(num_layers):
        kept = record.kept_heads(layer, num_heads)
        removed = record.pruned_heads.get(layer, [])
        rows.append(
            {
                "layer": layer,
                "kept": len(kept),
                "kv_kept": len({h // group for h in kept}),
                "removed": ", ".join(map(str, removed)) or "–",
            }
        )
    heads_total = num_heads * num_layers
    heads_kept = sum(row["kept"] for row in rows)
    return {
        "layers": rows,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv,
        "grouped_query": num_kv != num_heads,
        "heads_total": heads_total,
        "heads_kept": heads_kept,
        "heads_removed": heads_total - heads_kept,
        "heads_removed_pct": f"{(heads_total - heads_kept) / heads_total:.2%}",
        "layers_pruned": sum(1 for row in rows if row["kept"] < num_heads),
        "kv_heads_total": num_kv * num_layers,
        "kv_heads_kept": sum(row["kv_kept"] for row in rows),
    }


def _sparsity_rows(model: PreTrainedModel, pruning_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Real zero fraction of the target weights, grouped by their path inside a block (``mlp.up_proj``)."""
    patterns = (pruning_args or {}).get("prune_target_modules")
    modules = target_linear_modules(model, patterns)
    in_block = {
        id(sub): path for block in get_adapter(model).blocks(model) for path, sub in block.named_modules()
    }
    kinds = {f"{name}.weight": in_block.get(id(m)) or name.rsplit(".", 1)[-1] for name, m in modules.items()}
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
    model: PreTrainedModel,
    *,
    base_model: str | None = None,
    pruning_args: Mapping[str, Any] | None = None,
    params_before: int | None = None,
    eval_before: Mapping[str, float] | None = None,
    eval_after: Mapping[str, float] | None = None,
    dataset_name: str | None = None,
    task: str = "text-classification",
    speedup: float | None = None,
    heatmap_filename: str | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a pruned model: Hub metadata and what was pruned, with the real numbers.

    The metadata (``library_name``, ``base_model``, ``tags``, ``datasets``, ``metrics``, ``pipeline_tag`` and
    a ``model-index`` of the after-pruning results) is built with ``huggingface_hub.ModelCardData``. The body
    lists the heads kept per layer (from the pruning record in ``model.config``), the parameters before and
    after, the measured fraction of zero weights per module type, the evaluation before and after, the
    speed-up and the heatmap when given, and a snippet that loads the model with
    :func:`hf_gradprune.load_pruned`. No local path, token or user name of the machine ends up in the card.

    Args:
        model (`PreTrainedModel`): the pruned model, of a registered family.
        base_model (`str`, *optional*): Hub id of the model that was pruned. A local path is not written:
            the card says "a local checkpoint" and the metadata has no ``base_model``.
        pruning_args (`Mapping[str, Any]`, *optional*): the arguments used, e.g.
            ``PruningArguments.to_dict()``; keys holding a token are hidden and local paths replaced.
        params_before (`int`, *optional*): parameters of the model before pruning.
        eval_before (`Mapping[str, float]`, *optional*): metrics before pruning, e.g.
            ``{"eval_accuracy": 0.81}``; the ``eval_`` prefix is dropped.
        eval_after (`Mapping[str, float]`, *optional*): metrics after pruning; they make the ``model-index``
            (all but loss, runtime and throughput) when ``dataset_name`` is a Hub dataset id.
        dataset_name (`str`, *optional*): Hub id of the evaluation dataset, e.g. ``"rotten_tomatoes"``.
        task (`str`, *optional*, defaults to `"text-classification"`): the Hub task, used as
            ``pipeline_tag``, tag and model-index task.
        speedup (`float`, *optional*): measured inference speed-up of the pruned over the original model.
        heatmap_filename (`str`, *optional*): relative name of the heatmap PNG in the repository, e.g.
            ``"head_importance.png"`` (see :func:`save_head_importance_heatmap`).
        repo_id (`str`, *optional*): the repository the card is for, used in the loading snippet.
        model_name (`str`, *optional*): title and model-index name; defaults to the name part of
            ``repo_id``, else ``<base model name>-pruned``.

    Returns:
        `huggingface_hub.ModelCard`: save it as ``README.md`` in the model folder with ``card.save(path)``.

    Raises:
        ValueError: a non-positive ``params_before`` or ``speedup``, an absolute or parent-relative
            ``heatmap_filename``, or an invalid ``repo_id``.
        TypeError: ``pruning_args`` is not a mapping (pass ``PruningArguments.to_dict()``).

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
        >>> card.data.base_model, card.data.eval_results[0].metric_value
        ('google-bert/bert-base-uncased', 0.8)
        >>> "| 0 | 3 / 4 | 1 |" in card.text
        True
    """
    _check_card_args(pruning_args, params_before, speedup, heatmap_filename, repo_id)
    before = _numeric("eval_before", eval_before)
    after = _numeric("eval_after", eval_after)
    record = PruningRecord.from_config(model.config)
    heads = _layer_rows(model, record)
    sparsity = _sparsity_rows(model, pruning_args)

    hub_base = _hub_id(base_model)
    hub_dataset = _hub_id(dataset_name)
    if model_name is None:
        if repo_id is not None:
            model_name = repo_id.rsplit("/", 1)[-1]
        else:
            model_name = f"{(hub_base or model.config.model_type).rsplit('/', 1)[-1]}-pruned"
    elif _is_local_path(model_name):
        model_name = Path(model_name).name or "pruned-model"

    metrics = [name for name in dict.fromkeys([*after, *before]) if name not in RUN_METRICS]
    eval_results = _eval_results(after, task, hub_dataset)
    card_data = ModelCardData(
        library_name="transformers",
        base_model=hub_base,
        tags=list(dict.fromkeys([*CARD_TAGS, task])),
        datasets=[hub_dataset] if hub_dataset else None,
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
    if hub_dataset:
        dataset_text = f"[`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})"
    else:
        dataset_text = "a local dataset" if dataset_name else None
    params_after = model.num_parameters()
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
        model_type=model.config.model_type,
        version=__version__,
        record_version=f"hf_gradprune {record.version}" if record.pruned_heads else "no head pruning",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        pruning_args=_argument_rows(pruning_args),
        weight_importance=weight_importance,
        params_after=f"{params_after:,}",
        params_before=f"{params_before:,}" if params_before else None,
        params_reduction=f"{(params_before - params_after) / params_before:.2%}" if params_before else None,
        evaluation=_evaluation_rows(before, after),
        speedup=f"{speedup:.2f}×" if speedup else None,
        heatmap_filename=heatmap_filename,
        repo_id=repo_id,
        load_id=repo_id or "user/model-name",
        **heads,
        **sparsity,
    )
