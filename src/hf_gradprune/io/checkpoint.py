"""Checkpoint I/O: save and strictly reload models pruned to uneven shapes (any ``nn.Module``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from ..core.mask_files import load_masks, save_masks
from ..core.masks import MASKS_FILENAME, apply_masks, get_masks, masks_from_zeros
from ..core.record import PruningRecord, strip_record
from ..structured.surgery import prune_to_record, prune_units
from .folders import (
    check_has_model,
    read_checked,
    read_state_dict,
    resolve_folder,
    stored_shapes,
    weight_files,
)
from .saving import finish_interrupted_save, saving_into

logger = logging.getLogger(__name__)

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
LOAD_KWARGS = ("dtype", "subfolder")


def _architecture_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    names = getattr(config, "architectures", None) or []
    found = [getattr(transformers, name) for name in names if hasattr(transformers, name)]
    if not found:
        raise ValueError(
            f"config.json names no transformers architecture (architectures={names}): pass `model_class=`, "
            "e.g. `model_class=AutoModelForSequenceClassification`."
        )
    return found[0]


def _build(config: PretrainedConfig, model_class: type | None) -> PreTrainedModel:
    """An unpruned model of ``model_class`` (an Auto class, a ``PreTrainedModel`` class, or ``None`` for
    ``config.architectures[0]``) built from ``config`` without initialising weights."""
    dtype = getattr(config, "dtype", None)
    model_class = model_class or _architecture_class(config)
    with no_init_weights():
        if issubclass(model_class, _BaseAutoModelClass):
            return model_class.from_config(config, dtype=dtype)
        return model_class._from_config(config, dtype=dtype)


def _read_config(folder: Path, model_class: type | None) -> PretrainedConfig:
    """``config.json`` of ``folder`` through ``AutoConfig``; a ``model_type`` transformers does not know is
    read with ``model_class``'s own config class, and without one the error says to pass it."""
    try:
        return AutoConfig.from_pretrained(folder)
    except ValueError as error:
        config_class = getattr(model_class, "config_class", None)
        if isinstance(config_class, type) and issubclass(config_class, PretrainedConfig):
            return config_class.from_pretrained(folder)
        raise ValueError(
            f"transformers does not know the model_type of {os.fspath(folder)!r} ({error}). Pass the model's "
            "own class as `model_class=` (a PreTrainedModel subclass), or build the model and pass it as "
            "`model=`."
        ) from error


def _check_architecture(config: PretrainedConfig, model_class: type | None) -> None:
    """A ``PreTrainedModel`` class must be of the checkpoint's family."""
    expected = getattr(model_class, "config_class", None)
    if model_class is None or not isinstance(expected, type) or isinstance(config, expected):
        return
    raise ValueError(
        f"The checkpoint holds a {config.model_type!r} model ({', '.join(config.architectures or [])}), "
        f"and {model_class.__name__} builds {expected.model_type!r} models: pass a class of the checkpoint's "
        "family, an Auto class, or no `model_class`."
    )


def _check_masks_file(folder: Path, record: PruningRecord) -> dict[str, torch.Tensor] | None:
    """The saved weight masks, checked against the record; ``None`` when there is no masks file (the
    record's ``masked_entries`` then give them back from the weights, :func:`masks_from_zeros`)."""
    path = folder / MASKS_FILENAME
    if not path.is_file():
        if record.weight_masks and len(record.masked_entries) != record.weight_masks:
            raise FileNotFoundError(
                f"config.json of {folder.name!r} says {record.weight_masks} weight tensors are masked, but "
                f"{MASKS_FILENAME} is missing and the record (hf_gradprune {record.version}) does not count "
                "each tensor's masked entries, so the masks cannot be read from the weights' zeros: the "
                "pruned weights would not stay zero in training. Save with `save_pruned` or "
                "`PruningTrainer.save_model()`, or pass `apply_weight_masks=False` for inference only."
            )
        return None
    masks = read_checked(path, load_masks)
    if record.weight_masks and len(masks) != record.weight_masks:
        raise ValueError(
            f"{MASKS_FILENAME} in {folder.name!r} holds {len(masks)} masks, config.json says "
            f"{record.weight_masks}: the files come from different saves."
        )
    return masks


def _check_model_class(model_class: Any) -> None:
    if model_class is None:
        return
    if not isinstance(model_class, type) or not issubclass(
        model_class, (_BaseAutoModelClass, PreTrainedModel)
    ):
        shown = model_class.__name__ if isinstance(model_class, type) else type(model_class).__name__
        raise TypeError(
            "`model_class` must be a transformers Auto class (e.g. AutoModelForSequenceClassification) or a "
            f"PreTrainedModel subclass (e.g. BertForSequenceClassification), got {shown}; for any other "
            "nn.Module pass an instance as `model=`."
        )


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], record: PruningRecord) -> None:
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
    if isinstance(model, PreTrainedModel):
        model.tie_weights()


def replay_record(model: nn.Module, record: PruningRecord) -> None:
    """Cut ``model`` (built unpruned) to the shapes of ``record``, and store the record in its config."""
    prune_units(model, record.pruned, allow_empty=True)
    record.save_to_config(model.config)


def fit_to_checkpoint(
    output_dir: str | os.PathLike, model: nn.Module, state_dict: Mapping[str, torch.Tensor], *_: Any
) -> None:
    """Load-state-dict pre-hook (``functools.partial(fit_to_checkpoint, output_dir)``): weights shaped by a
    structural cut ``model`` has not made are those of a checkpoint in ``output_dir`` (the ``Trainer`` loads
    them before any callback event); ``model`` is cut to that checkpoint's record first. Weights of no such
    checkpoint are a ``ValueError`` saying what to call."""
    own = model.state_dict()
    if all(key not in own or own[key].shape == value.shape for key, value in state_dict.items()):
        return
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    records = []
    for folder in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        with contextlib.suppress(FileNotFoundError, ValueError):
            held = stored_shapes(folder)
            if all(held.get(key) == shape for key, shape in shapes.items()):
                records.append(PruningRecord.from_folder(folder))
    kinds = {json.dumps([r.pruned, r.removed_layers], sort_keys=True) for r in records}
    if len(kinds) == 1 and records[0].is_empty():
        return  # no structural cut explains the shapes: torch names the mismatch
    if len(kinds) != 1:
        raise ValueError(
            "The checkpoint's weights have the shapes of heads, neurons or layers removed from this model, "
            f"and no checkpoint of `output_dir` {os.fspath(output_dir)!r} tells which. Call "
            "`callback.resume_from(checkpoint, model)` (GradientPruningCallback) before "
            "`trainer.train(resume_from_checkpoint=checkpoint)`: it cuts the model to the checkpoint's "
            "pruning record first; PruningTrainer does this itself."
        )
    prune_to_record(model, records[0])


def load_pruned(
    path_or_repo_id: str | os.PathLike,
    model_class: type | None = None,
    apply_weight_masks: bool = True,
    model: nn.Module | None = None,
    allow_pickle: bool = False,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a pruned checkpoint from a folder or a Hub repo id: shapes rebuilt, weights loaded strictly.

    A transformers model is built from ``config.json``, the recorded pruning (heads, FFN neurons, per
    layer) is replayed, and the safetensors weights are loaded strictly: a missing, unexpected or mis-shaped
    key is an error, never a silent re-initialisation. A checkpoint without a pruning record goes through
    plain ``from_pretrained``. Any other ``nn.Module`` (a CNN trained with the ``Trainer``) is passed as
    ``model=``, built by your code, and receives the weights strictly. Weight masks saved beside the weights
    (``pruning_masks.safetensors``) are applied again, so pruned weights stay zero if the model trains on.
    Damaged files, a masks file that is missing or does not match, a record of a newer hf_gradprune and a
    model class of another family are errors; a save that was killed while moving its files is completed
    first (:func:`saving_into`).

    Args:
        path_or_repo_id (`str` or `os.PathLike`): a local folder or a Hub repository id.
        model_class (`type`, *optional*): a transformers Auto class (``AutoModelForCausalLM``) or a
            ``PreTrainedModel`` subclass; defaults to ``config.architectures[0]``.
        apply_weight_masks (`bool`, *optional*, defaults to `True`): re-apply saved weight masks (set
            `False` for inference only: the masks cost one byte per masked weight).
        model (`nn.Module`, *optional*): an instance to load into, for models that are not transformers
            models; its own pruning record, if any, must be the checkpoint's.
        allow_pickle (`bool`, *optional*, defaults to `False`): read a folder that has only
            ``pytorch_model.bin`` (with ``torch.load(weights_only=True)``); otherwise safetensors only.
        from_pretrained_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
            ``force_download`` (for the download), ``subfolder`` (a folder inside the repository or folder,
            such as the ``last-checkpoint`` the ``Trainer`` pushes) and ``dtype``.

    Raises:
        TypeError: an unsupported keyword, or a ``model_class`` that is no Auto or ``PreTrainedModel`` class.
        ValueError: weights that do not match the pruning record.

    Example:
        >>> from transformers import AutoModel, BertConfig, BertModel
        >>> import tempfile
        >>> from hf_gradprune import prune_heads
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> _ = prune_heads(model, {1: [0, 2]})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     model.save_pretrained(folder)
        ...     again = load_pruned(folder, model_class=AutoModel)
        >>> again.encoder.layer[1].attention.self.key.out_features
        16
    """
    allowed = HUB_KWARGS + LOAD_KWARGS
    unknown = sorted(set(from_pretrained_kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_pruned() got unsupported keyword arguments {unknown}; allowed: {', '.join(allowed)}."
        )
    _check_model_class(model_class)
    if model is not None and model_class is not None:
        raise ValueError("Pass `model_class` or `model`, not both.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module instance, got {type(model).__name__}.")
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in HUB_KWARGS}
    folder = resolve_folder(path_or_repo_id, from_pretrained_kwargs.get("subfolder", ""), **hub_kwargs)
    if os.access(folder, os.W_OK):
        finish_interrupted_save(folder)
    dtype = from_pretrained_kwargs.get("dtype")
    if model is not None:
        record = PruningRecord.from_config(getattr(model, "config", None))
        masks = _check_masks_file(folder, record) if apply_weight_masks else None
        load_strict(model, read_state_dict(folder, allow_pickle), record)
        if dtype is not None:
            model.to(dtype)
    else:
        check_has_model(folder)
        config = _read_config(folder, model_class)
        record = PruningRecord.from_config(config)
        _check_architecture(config, model_class)
        masks = _check_masks_file(folder, record) if apply_weight_masks else None
        if not record.is_empty():
            if dtype is not None:
                config.dtype = dtype
            model = _build(strip_record(config), model_class)
            replay_record(model, record)
            load_strict(model, read_state_dict(folder, allow_pickle), record)
            if model.can_generate() and (folder / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(folder)
        else:
            weight_files(folder, allow_pickle)  # the same checks (damage, pickle) before transformers reads
            cls = model_class or _architecture_class(config)
            model = cls.from_pretrained(
                folder, use_safetensors=not allow_pickle, **({"dtype": dtype} if dtype else {})
            )
    if masks is None and apply_weight_masks and record.masked_entries:
        masks = masks_from_zeros(model, record)  # a folder saved without its masks file
    if masks:
        apply_masks(model, masks)
    return model.eval()


def save_pruned(model: nn.Module, save_directory: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Save a pruned model so that :func:`load_pruned` gives it back: weights, config with record, masks.

    A transformers model goes through ``save_pretrained`` (safetensors, the model's own keys); any other
    ``nn.Module`` writes its state dict to ``model.safetensors``. Weight masks go to
    ``pruning_masks.safetensors``. Every file is written in a temporary folder first and moved into place
    by ``os.replace`` (:func:`saving_into`): a process killed while saving leaves the previous files
    loadable.

    Args:
        model (`nn.Module`): the pruned model.
        save_directory (`str` or `os.PathLike`): the folder (created if missing; other files in it stay).
        save_pretrained_kwargs: more arguments of ``save_pretrained`` (transformers models only).

    Returns:
        `Path`: the folder.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from hf_gradprune.core.masks import apply_masks
        >>> cnn = nn.Sequential(nn.Conv2d(1, 2, 3))
        >>> apply_masks(cnn, {"0.weight": torch.rand(2, 1, 3, 3) > 0.5})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = save_pruned(cnn, folder)
        ...     again = load_pruned(folder, model=nn.Sequential(nn.Conv2d(1, 2, 3)))
        >>> torch.equal(again[0].weight_mask, cnn[0].weight_mask)
        True
    """
    if save_pretrained_kwargs and not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"{sorted(save_pretrained_kwargs)} are save_pretrained arguments; "
            f"{type(model).__name__} is not a transformers model."
        )
    folder = Path(save_directory)
    with saving_into(folder, owned=(MASKS_FILENAME,)) as partial:
        if isinstance(model, PreTrainedModel):
            model.save_pretrained(partial, **save_pretrained_kwargs)
        else:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, partial / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
        masks = get_masks(model)
        if masks:
            save_masks(masks, partial / MASKS_FILENAME)
    return folder
