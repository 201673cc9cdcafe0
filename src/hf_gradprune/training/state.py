"""The Trainer's training state without pickle: an optimizer's, a scheduler's and the RNGs' nested state as
JSON for the structure and scalars beside safetensors for the tensors, each file written under a temporary
name and renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready form of a nested state: tensors and arrays go to ``tensors`` under their path."""
    if torch.is_tensor(value):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
        return {"__ndarray__": path, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Cannot store {type(value).__name__} at {path!r} without pickle.")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return {k: _decode(v, tensors) for k, v in value["__dict__"]}


def save_state(state: Any, folder: str | os.PathLike, stem: str) -> None:
    """Write a nested training state (optimizer, scheduler, RNG) without pickle.

    Tensors go to ``<stem>.safetensors``, the structure and scalars to ``<stem>.json``; each file is written
    to a temporary name and renamed.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, stem, tensors))
    for name, write in (
        (f"{stem}.safetensors", lambda path: save_file(tensors, path, metadata={"format": "pt"})),
        (f"{stem}.json", lambda path: Path(path).write_text(structure)),
    ):
        partial = folder / f".{name}.{os.getpid()}.tmp"
        write(partial)
        os.replace(partial, folder / name)


def load_state(folder: str | os.PathLike, stem: str) -> Any:
    """Read what :func:`save_state` wrote (tensors on the CPU)."""
    folder = Path(folder)
    tensors = load_file(folder / f"{stem}.safetensors")
    return _decode(json.loads((folder / f"{stem}.json").read_text()), tensors)


def has_state(folder: str | os.PathLike, stem: str) -> bool:
    """Whether :func:`save_state` wrote ``stem`` into ``folder``."""
    return (Path(folder) / f"{stem}.json").is_file()
