"""Weight masks in a file of their own (``pruning_masks.safetensors`` beside a checkpoint's weights):
safetensors of uint8, never half-written, refused when another tool wrote the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .masks import check_mask

_METADATA = {"format": "pt", "hf_gradprune": "weight_masks"}


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``masks`` to a safetensors file, never half-written (temporary file, then ``os.replace``).

    Masks are stored as uint8 with metadata ``{"format": "pt", "hf_gradprune": "weight_masks"}``;
    :data:`MASKS_FILENAME` is the file's conventional name in a checkpoint folder.

    Args:
        masks (`Mapping[str, torch.Tensor]`): parameter name to bool mask, as from :func:`get_masks`.
        path (`str` or `os.PathLike`): the file to write; its folder must exist.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_masks({"weight": torch.tensor([True, False])}, Path(folder) / "masks.safetensors")
        ...     load_masks(Path(folder) / "masks.safetensors")
        {'weight': tensor([ True, False])}
    """
    for name, mask in masks.items():
        check_mask(name, mask)
    tensors = {name: mask.detach().to("cpu", torch.uint8).contiguous() for name, mask in masks.items()}
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, partial, metadata=_METADATA)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`: parameter name to bool mask on the CPU.

    Args:
        path (`str` or `os.PathLike`): the masks file.

    Raises:
        ValueError: the file was not written by :func:`save_masks`.
    """
    with safe_open(path, framework="pt") as masks_file:
        metadata = masks_file.metadata() or {}
        if metadata.get("hf_gradprune") != _METADATA["hf_gradprune"]:
            raise ValueError(
                f"{os.fspath(path)!r} is not a masks file of hf_gradprune (metadata {metadata}): "
                "write it with `save_masks`."
            )
        names = masks_file.keys()
        return {name: masks_file.get_tensor(name).bool() for name in names}
