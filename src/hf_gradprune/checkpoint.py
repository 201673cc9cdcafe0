"""Checkpoint I/O: strict reload of models pruned to uneven shapes, and training state without pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .masks import MASKS_FILENAME, apply_masks, load_masks
from .record import PruningRecord, strip_record
from .surgery import prune_heads

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
LOAD_KWARGS = ("dtype",)


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id downloaded with ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    text = os.fspath(path_or_repo_id)
    if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(
            f"`path_or_repo_id` {text!r} is not a folder (a Hub repo id looks like 'user/name'): "
            "pass the folder given to `save_pretrained`."
        )
    return Path(snapshot_download(text, **hub_kwargs))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors weights in ``folder`` (single file or sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"No model.safetensors in {folder.name!r}: hf_gradprune reads safetensors checkpoints only "
            "(save with `model.save_pretrained(path)`)."
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    return state


def _model_class(
    config: PretrainedConfig, model_class: type[PreTrainedModel] | None
) -> type[PreTrainedModel]:
    if model_class is not None:
        return model_class
    names = getattr(config, "architectures", None) or []
    found = [getattr(transformers, name) for name in names if hasattr(transformers, name)]
    if not found:
        raise ValueError(
            f"config.json names no transformers architecture (architectures={names}): "
            "pass `model_class=`, e.g. `model_class=BertForSequenceClassification`."
        )
    return found[0]


def load_strict(model: PreTrainedModel, state: dict[str, torch.Tensor], record: PruningRecord) -> None:
    """Load ``state`` into ``model``: any missing, unexpected or mis-shaped key is an error."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        (f"missing keys {missing}" if missing else ""),
        (f"unexpected keys {unexpected}" if unexpected else ""),
        (
            f"shapes that disagree with the pruning record {record.to_dict()}: {mismatched}"
            if mismatched
            else ""
        ),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            "The checkpoint does not match its pruning record; nothing is re-initialised silently: "
            + "; ".join(problems)
            + "."
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def load_pruned(
    path_or_repo_id: str | os.PathLike,
    model_class: type[PreTrainedModel] | None = None,
    apply_weight_masks: bool = True,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a checkpoint saved after :func:`hf_gradprune.prune_heads`, from a folder or a Hub repo id.

    The model is built from ``config.json``, the recorded pruning is replayed, and the safetensors
    weights are loaded strictly. A checkpoint without a pruning record goes through plain
    ``model_class.from_pretrained``. Weight masks saved beside the weights (``pruning_masks.safetensors``)
    are applied again, so pruned weights stay zero if the model is trained further.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): a local folder or a Hub repository id.
        model_class (`type[PreTrainedModel]`, *optional*): defaults to ``config.architectures[0]``.
        apply_weight_masks (`bool`, *optional*, defaults to `True`): re-apply saved weight masks (set
            `False` for inference only: the masks cost one byte per masked weight).
        from_pretrained_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
            ``force_download`` (for the download) and ``dtype``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import tempfile
        >>> from hf_gradprune import prune_heads
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> _ = prune_heads(model, {1: [0, 2]})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     model.save_pretrained(folder)
        ...     again = load_pruned(folder)
        >>> again.encoder.layer[1].attention.self.key.out_features
        16
    """
    allowed = HUB_KWARGS + LOAD_KWARGS
    unknown = sorted(set(from_pretrained_kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_pruned() got unsupported keyword arguments {unknown}; allowed: {', '.join(allowed)}."
        )
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    config = AutoConfig.from_pretrained(folder)
    cls = _model_class(config, model_class)
    record = PruningRecord.from_config(config)
    dtype = from_pretrained_kwargs.get("dtype")
    if record.pruned_heads:
        with no_init_weights():
            model = cls._from_config(strip_record(config), dtype=dtype or getattr(config, "dtype", None))
        prune_heads(model, record.pruned_heads)
        record.save_to_config(model.config)
        load_strict(model, read_state_dict(folder), record)
        if model.can_generate() and (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
    else:
        model = cls.from_pretrained(folder, **({"dtype": dtype} if dtype else {}))
    if apply_weight_masks and (folder / MASKS_FILENAME).is_file():
        apply_masks(model, load_masks(folder / MASKS_FILENAME))
    return model.eval()


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
