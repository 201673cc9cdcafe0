"""A saved model's folder: found locally or downloaded from the Hub, its safetensors weights read (every
header checked, a damaged file named), and what it holds said when it holds no model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from ..core.masks import MASKS_FILENAME

_T = TypeVar("_T")

PICKLED_WEIGHTS = "pytorch_model.bin"


def check_has_model(folder: Path) -> None:
    """A folder without ``config.json`` holds no saved transformers model: say what it holds instead."""
    if (folder / CONFIG_NAME).is_file():
        return
    held = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    weights = [name for name in held if name.endswith(".safetensors") and name != MASKS_FILENAME]
    if not held:
        what = "it is empty"
    elif MASKS_FILENAME in held and not weights:
        what = f"it holds only weight masks ({MASKS_FILENAME}), not the model they mask"
    else:
        what = f"it holds {held}"
    raise ValueError(
        f"`path_or_repo_id` {os.fspath(folder)!r} holds no saved model: there is no {CONFIG_NAME} ({what}). "
        "Pass the folder given to `save_pretrained` or `save_pruned`, or, for a model that is not a "
        "transformers model, build it and pass it as `model=`."
    )


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id downloaded with ``huggingface_hub.snapshot_download``
    (only ``subfolder`` when given); then ``subfolder`` inside it."""
    if not isinstance(subfolder, str):
        raise TypeError(
            f"`subfolder` must be a str such as 'last-checkpoint', got {type(subfolder).__name__}."
        )
    path = Path(path_or_repo_id)
    subfolder = subfolder.strip("/")
    if not path.is_dir():
        text = os.fspath(path_or_repo_id)
        if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
            raise FileNotFoundError(
                f"`path_or_repo_id` {text!r} is not a folder (a Hub repo id looks like 'user/name'): "
                "pass the folder given to `save_pretrained`."
            )
        patterns = [f"{subfolder}/*"] if subfolder else None
        path = Path(snapshot_download(text, allow_patterns=patterns, **hub_kwargs))
    if subfolder and not (path / subfolder).is_dir():
        raise FileNotFoundError(
            f"`subfolder` {subfolder!r} is not a folder of {os.fspath(path_or_repo_id)!r}; its folders are "
            f"{sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith('.'))}."
        )
    return path / subfolder if subfolder else path


def read_checked(path: Path, read: Callable[[Path], _T]) -> _T:
    """``read(path)``; a damaged or truncated safetensors file is a ``ValueError`` that names it."""
    try:
        return read(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path.name} in {path.parent.name!r} is damaged or truncated ({error}); nothing was loaded: "
            "save the model again, or download it again with `force_download=True`."
        ) from error


def _read_header(path: Path) -> None:
    with safe_open(path, framework="pt"):  # checks the header against the file's length, reads no tensor
        pass


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of ``folder`` (safetensors, single or sharded; ``pytorch_model.bin`` only with
    ``allow_pickle``), every safetensors header checked; no tensor is read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} in {folder.name!r} lists shards that are not there: {missing}; nothing was "
                "loaded: copy or download the whole folder."
            )
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        shards = [SAFE_WEIGHTS_NAME]
    elif (folder / PICKLED_WEIGHTS).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{folder.name!r} has only {PICKLED_WEIGHTS}, a pickle, which can run code when read: "
                "hf_gradprune reads safetensors. Pass `allow_pickle=True` if you trust its source (it is "
                "then read with torch.load(weights_only=True)), or convert it to model.safetensors."
            )
        return [folder / PICKLED_WEIGHTS]
    else:
        raise FileNotFoundError(
            f"No model.safetensors in {folder.name!r}: hf_gradprune reads safetensors checkpoints only "
            "(save with `model.save_pretrained(path)`)."
        )
    for shard in shards:
        read_checked(folder / shard, _read_header)
    return [folder / shard for shard in shards]


def read_state_dict(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors weights in ``folder`` (single file or sharded); with ``allow_pickle``,
    a folder with only ``pytorch_model.bin`` is read by ``torch.load(weights_only=True)``."""
    files = weight_files(folder, allow_pickle)
    if files[0].name == PICKLED_WEIGHTS:
        return torch.load(files[0], map_location="cpu", weights_only=True)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_checked(path, load_file))
    return state


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``folder``'s safetensors weights, read from the headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder, allow_pickle=False):
        with safe_open(path, framework="pt") as weights:
            shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})  # noqa: SIM118
    return shapes
