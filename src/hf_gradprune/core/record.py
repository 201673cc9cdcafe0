"""The pruning record: what was removed, stored in ``config.json`` so a checkpoint describes itself."""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig

from .._version import __version__

CONFIG_KEY = "hf_gradprune"
LEGACY_KEY = "pruned_heads"
"""Where transformers 4's ``prune_heads`` recorded removed heads (layer to original head indices)."""
_PREFIX = "pruned_"
RECORD_FORMAT = 1
"""The layout of the record this version writes; a record of a newer format is refused, not misread."""
_KNOWN = {"version", "format", "weight_masks", "masked_entries", "removed_layers"}


def _clean(layers: dict) -> dict[int, list[int]]:
    return {
        int(k): sorted({int(u) for u in v}) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0])) if v
    }


@dataclass
class PruningRecord:
    """Units removed per structure and layer, in the unit indices of the original (unpruned) model, and the
    whole layers removed.

    Stored in ``config.json`` under ``hf_gradprune`` as ``pruned_<structure>`` entries (``pruned_heads``,
    ``pruned_ffn``), each a map from layer to removed units; the per-layer sizes follow from them. Layers are
    numbered as the model stands: after a whole layer is removed (``removed_layers``, in the original
    model's numbering) the config holds the new depth and the layers after it move up.

    Args:
        pruned (`dict[str, dict[int, list[int]]]`, *optional*): structure name (``"heads"``, ``"ffn"``) to
            layer index to removed units.
        version (`str`, *optional*): the hf_gradprune version that wrote the record.
        weight_masks (`int`, *optional*, defaults to 0): masked weight tensors, whose masks a saved folder
            holds in ``pruning_masks.safetensors``.
        masked_entries (`dict[str, int]`, *optional*): each masked tensor's count of masked entries: a folder
            saved without the masks file (``Trainer.save_model`` with the callback, ``save_pretrained``) has
            them back exactly from the weights' zeros when each tensor has exactly that many.
        removed_layers (`list[int]`, *optional*): whole layers removed, in the original model's numbering.

    Example:
        >>> record = PruningRecord({"heads": {0: [3, 1]}, "ffn": {1: [5]}})
        >>> record.kept("heads", 0, num_units=4), record.pruned_heads
        ([0, 2], {0: [1, 3]})
        >>> PruningRecord.from_dict(record.to_dict()) == record
        True
    """

    pruned: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    version: str = __version__
    weight_masks: int = 0
    masked_entries: dict[str, int] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pruned = {name: _clean(layers) for name, layers in self.pruned.items() if _clean(layers)}
        self.removed_layers = sorted({int(layer) for layer in self.removed_layers})

    def remove_layers(self, positions: list[int], num_layers: int) -> None:
        """Record the layers at ``positions`` (numbered as the model stands, ``num_layers`` of them) as
        removed: their entries go and the layers after them move up."""
        kept = [layer for layer in range(num_layers) if layer not in positions]
        moved = {old: new for new, old in enumerate(kept)}
        pruned = {
            name: {moved[layer]: units for layer, units in layers.items() if layer in moved}
            for name, layers in self.pruned.items()
        }
        self.pruned = {name: layers for name, layers in pruned.items() if layers}
        original = self.original_layers(num_layers)
        self.removed_layers = sorted({*self.removed_layers, *(original[p] for p in positions)})

    def original_layers(self, num_layers: int) -> list[int]:
        """The original index of each of the ``num_layers`` layers the model has now."""
        depth = num_layers + len(self.removed_layers)
        return [layer for layer in range(depth) if layer not in self.removed_layers]

    @property
    def pruned_heads(self) -> dict[int, list[int]]:
        """Layer index to removed query heads."""
        return self.pruned.get("heads", {})

    def removed(self, structure: str, layer: int) -> list[int]:
        """Original indices of the units of ``structure`` removed from ``layer``."""
        return self.pruned.get(structure, {}).get(layer, [])

    def kept(self, structure: str, layer: int, num_units: int) -> list[int]:
        """Original indices of the units of ``structure`` still present in ``layer``."""
        removed = set(self.removed(structure, layer))
        return [u for u in range(num_units) if u not in removed]

    def add(self, structure: str, layer: int, units: list[int]) -> None:
        """Record ``units`` of ``structure`` as removed from ``layer``."""
        layers = self.pruned.setdefault(structure, {})
        layers[layer] = sorted(set(layers.get(layer, [])) | set(units))

    def is_empty(self) -> bool:
        """Whether nothing was removed."""
        return not any(self.pruned.values()) and not self.removed_layers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (layer keys as strings, sorted); ``pruned_heads`` is always present."""
        data: dict[str, Any] = {"version": self.version, "format": RECORD_FORMAT, "pruned_heads": {}}
        for name, layers in sorted(self.pruned.items()):
            data[f"{_PREFIX}{name}"] = {str(k): v for k, v in sorted(layers.items())}
        if self.weight_masks:
            data["weight_masks"] = self.weight_masks
        if self.masked_entries:
            data["masked_entries"] = dict(sorted(self.masked_entries.items()))
        if self.removed_layers:
            data["removed_layers"] = list(self.removed_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        """Inverse of :meth:`to_dict`; a record of a newer format is a ``ValueError``, unknown keys warn."""
        version = data.get("version", __version__)
        written = data.get("format", 1)
        if not isinstance(written, int) or written > RECORD_FORMAT:
            raise ValueError(
                f"The pruning record in config.json was written by hf_gradprune {version} (record format "
                f"{written!r}); hf_gradprune {__version__} reads format {RECORD_FORMAT} and older: upgrade "
                "with `pip install -U hf_gradprune` to load this model."
            )
        unknown = sorted(key for key in data if key not in _KNOWN and not key.startswith(_PREFIX))
        if unknown:
            warnings.warn(
                f"The pruning record (hf_gradprune {version}) has keys this version ignores: {unknown}.",
                stacklevel=2,
            )
        pruned = {key.removeprefix(_PREFIX): v for key, v in data.items() if key.startswith(_PREFIX)}
        return cls(
            pruned=pruned,
            version=version,
            weight_masks=int(data.get("weight_masks", 0)),
            masked_entries={str(k): int(v) for k, v in data.get("masked_entries", {}).items()},
            removed_layers=list(data.get("removed_layers", [])),
        )

    @classmethod
    def from_config(cls, config: PretrainedConfig | SimpleNamespace | None) -> PruningRecord:
        """The record in ``config``: hf_gradprune's own, else the ``pruned_heads`` that transformers 4's
        ``prune_heads`` wrote (same original head indices); an empty record when there is none."""
        data = getattr(config, CONFIG_KEY, None)
        if data:
            return cls.from_dict(data)
        legacy = getattr(config, LEGACY_KEY, None)
        return cls({"heads": legacy}, version="transformers 4 prune_heads") if legacy else cls()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> PruningRecord:
        """The record in ``folder``'s ``config.json``, read as JSON (no config class: a model of any family,
        or none); an empty record when the folder has no ``config.json`` or it holds no record."""
        path = Path(folder) / "config.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls.from_config(SimpleNamespace(**{k: data[k] for k in (CONFIG_KEY, LEGACY_KEY) if k in data}))

    def save_to_config(self, config: PretrainedConfig) -> None:
        """Store this record in ``config`` (it is written to ``config.json`` by ``save_pretrained``), in
        place of a transformers 4 ``pruned_heads``."""
        setattr(config, CONFIG_KEY, copy.deepcopy(self.to_dict()))
        if hasattr(config, LEGACY_KEY):
            delattr(config, LEGACY_KEY)


def strip_record(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` without a pruning record: the config of the original, unpruned shapes."""
    clean = copy.deepcopy(config)
    for key in (CONFIG_KEY, LEGACY_KEY):
        if hasattr(clean, key):
            delattr(clean, key)
    return clean
