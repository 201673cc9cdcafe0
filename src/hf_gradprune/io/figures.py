"""Figures of a pruned model: the importance of every head as a heatmap (removed heads grey), and the units
of a structure kept in each layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torch import nn

from ..core.adapters import find_adapter, get_adapter
from ..core.record import PruningRecord

REMOVED_COLOR = "lightgrey"


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


def unit_sizes_figure(model: nn.Module, structure: str = "ffn") -> Figure:
    """A bar chart of the units of ``structure`` (a structure of the blocks of the model's family) kept in
    each layer, against the original number (a dashed line).

    Args:
        model (`nn.Module`): a model of a registered family.
        structure (`str`, *optional*, defaults to `"ffn"`): the structure's name.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_gradprune import prune_units
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> _ = prune_units(model, {"ffn": {0: [1, 2, 3]}})
        >>> figure = unit_sizes_figure(model, "ffn")
        >>> [round(bar.get_height()) for bar in figure.axes[0].patches], figure.axes[0].get_title()
        ([34, 37], 'FFN neurons kept per layer')
    """
    sizes = structure_sizes(model)[structure]
    label = get_adapter(model).structure(structure).units_label
    figure = Figure(figsize=(max(4.0, 0.3 * len(sizes["kept"]) + 2.0), 3.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(range(len(sizes["kept"])), sizes["kept"], color="tab:blue")
    axes.axhline(sizes["units"], color="black", linestyle="--", linewidth=1, label="original")
    axes.set_title(f"{label[:1].upper()}{label[1:]} kept per layer")
    axes.set_xlabel("layer")
    axes.set_ylabel("units")
    axes.xaxis.set_major_locator(MaxNLocator(nbins=min(len(sizes["kept"]), 16), integer=True))
    axes.legend(loc="lower right", frameon=False)
    return figure


def structure_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per structure of the model's family: units per layer originally, and kept per layer (the record)."""
    adapter = find_adapter(model)
    if adapter is None:
        return {}
    record = PruningRecord.from_config(model.config)
    sizes = {}
    for structure in adapter.structures:
        units = adapter.num_units(structure, model.config)
        kept = [record.kept(structure.name, layer, units) for layer in range(len(adapter.blocks(model)))]
        sizes[structure.name] = {"units": units, "kept": [len(k) for k in kept], "kept_units": kept}
    return sizes
