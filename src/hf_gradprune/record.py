"""The pruning record: what was removed, stored in ``config.json`` so a checkpoint describes itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from . import __version__

CONFIG_KEY = "hf_gradprune"


@dataclass
class PruningRecord:
    """Heads removed per layer, in the indices of the original (unpruned) model.

    Args:
        pruned_heads (`dict[int, list[int]]`, *optional*): layer index to sorted removed query heads.
        version (`str`, *optional*): the hf_gradprune version that wrote the record.

    Example:
        >>> record = PruningRecord(pruned_heads={0: [3, 1]})
        >>> record.kept_heads(0, num_heads=4)
        [0, 2]
        >>> PruningRecord.from_dict(record.to_dict()) == record
        True
    """

    pruned_heads: dict[int, list[int]] = field(default_factory=dict)
    version: str = __version__

    def __post_init__(self) -> None:
        self.pruned_heads = {int(k): sorted(int(h) for h in v) for k, v in self.pruned_heads.items() if v}

    def kept_heads(self, layer: int, num_heads: int) -> list[int]:
        """Original indices of the heads still present in ``layer``."""
        removed = set(self.pruned_heads.get(layer, ()))
        return [h for h in range(num_heads) if h not in removed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (layer keys as strings, sorted)."""
        heads = {str(k): v for k, v in sorted(self.pruned_heads.items())}
        return {"version": self.version, "pruned_heads": heads}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(pruned_heads=data.get("pruned_heads", {}), version=data.get("version", __version__))

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> PruningRecord:
        """The record stored in ``config`` (an empty record when the model was never pruned)."""
        data = getattr(config, CONFIG_KEY, None)
        return cls.from_dict(data) if data else cls()

    def save_to_config(self, config: PretrainedConfig) -> None:
        """Store this record in ``config`` (it is written to ``config.json`` by ``save_pretrained``)."""
        setattr(config, CONFIG_KEY, copy.deepcopy(self.to_dict()))


def strip_record(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` without a pruning record: the config of the original, unpruned shapes."""
    clean = copy.deepcopy(config)
    if hasattr(clean, CONFIG_KEY):
        delattr(clean, CONFIG_KEY)
    return clean
