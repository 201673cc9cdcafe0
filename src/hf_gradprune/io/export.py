"""Vanilla exports: a model cut the same in every layer, saved so that plain transformers loads it.

The family's adapter says how a uniform cut reads in the config (``Structure.vanilla``: Llama's
``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``, GPT-2's ``n_inner``, BERT's
``intermediate_size``); the weights keep their pruned zeros and the pruning record is left out, so
``AutoModel*.from_pretrained`` rebuilds the model with no hf_gradprune installed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from ..core.adapters import get_adapter
from ..core.masks import MASKS_FILENAME
from ..core.record import PruningRecord, strip_record
from .cards import create_pruning_model_card
from .checkpoint import load_strict
from .saving import saving_into


def _unsayable(model: nn.Module, name: str) -> ValueError:
    reason = get_adapter(model).structure(name).no_vanilla
    return ValueError(
        f"A {model.config.model_type!r} config cannot say fewer {name} per layer with the family's own code "
        f"({reason}): export a model whose {name} are all kept, or share it with `save_pruned` and "
        "`load_pruned`."
    )


def check_exportable(model: nn.Module, structures: Iterable[str]) -> None:
    """Raise before any work if cutting ``structures`` would give a model ``export_vanilla`` cannot write
    (none to cut, as when pruning weights only: any model exports)."""
    structures = list(structures)
    if not structures:
        return
    adapter = get_adapter(model)
    for name in structures:
        if adapter.structure(name).vanilla is None:
            raise _unsayable(model, name)


def vanilla_config_changes(model: nn.Module) -> dict[str, Any]:
    """The config changes that describe ``model``'s cut with its family's own code.

    Raises:
        ValueError: layers of different sizes (named), a layer with no unit left, or a structure the family
            cannot express in its config.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_gradprune import prune_units
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=2, intermediate_size=37, vocab_size=99))
        >>> _ = prune_units(model, {"heads": {0: [0, 1], 1: [2, 3]}, "ffn": {0: [5], 1: [7]}})
        >>> vanilla_config_changes(model)
        {'num_attention_heads': 2, 'num_key_value_heads': 1, 'head_dim': 8, 'intermediate_size': 36}
    """
    config = model.config
    record = PruningRecord.from_config(config)
    if not record.pruned:  # no unit cut (weights only, or whole layers: the config says the depth)
        return {}
    adapter = get_adapter(model)
    num_layers = len(adapter.blocks(model))
    changes: dict[str, Any] = {}
    for structure in adapter.structures:
        total = adapter.num_units(structure, config)
        kept = [len(record.kept(structure.name, layer, total)) for layer in range(num_layers)]
        if set(kept) == {total}:
            continue
        if len(set(kept)) > 1:
            sizes = ", ".join(f"layer {layer}: {count}" for layer, count in enumerate(kept))
            raise ValueError(
                f"export_vanilla needs as many {structure.name!r} units in every layer, and the layers keep "
                f"{sizes}. Prune with `--uniform_per_layer` (`uniform=True`), `--prune_heads_per_layer` or "
                "`--prune_ffn_fraction`, or share this model with `save_pruned` and `load_pruned`."
            )
        if kept[0] == 0:
            raise ValueError(
                f"Every layer lost all its {structure.name!r} units: no config of the family says so."
            )
        if structure.vanilla is None:
            raise _unsayable(model, structure.name)
        changes.update(structure.vanilla(config, kept[0]))
    return changes


def export_vanilla(model: nn.Module, save_directory: str | os.PathLike, **card_kwargs: Any) -> Path:
    """Save a model pruned the same in every layer as an ordinary transformers checkpoint.

    The config gets the family's own sizes (:func:`vanilla_config_changes`) and no pruning record; the
    weights, with their pruned zeros, are first loaded strictly into a model built from that config, so the
    folder is proven to load with plain ``from_pretrained``; weight masks are not written (their zeros are in
    the weights). The model card (``README.md``) says how the model was pruned and loads it with
    transformers alone. Written whole or not at all (:func:`hf_gradprune.io.saving.saving_into`).

    Args:
        model (`nn.Module`): a transformers model of a registered family, cut the same in every layer.
        save_directory (`str` or `os.PathLike`): the folder.
        card_kwargs: arguments of :func:`hf_gradprune.io.cards.create_pruning_model_card` (``base_model``,
            ``dataset_name``, ``eval_after`` ...).

    Returns:
        `Path`: the folder.

    Example:
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import prune_units
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> _ = prune_units(model, {"ffn": {0: [0, 1], 1: [3, 4]}})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = export_vanilla(model, folder)
        ...     again = BertForSequenceClassification.from_pretrained(folder)
        >>> again.config.intermediate_size
        35
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"export_vanilla writes transformers models, got {type(model).__name__}.")
    changes = vanilla_config_changes(model)
    config = strip_record(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    with no_init_weights():
        vanilla = type(model)._from_config(config, dtype=next(model.parameters()).dtype)
    load_strict(vanilla, {k: v.detach() for k, v in model.state_dict().items()}, PruningRecord())
    if model.can_generate():
        vanilla.generation_config = copy.deepcopy(model.generation_config)
    folder = Path(save_directory)
    # An earlier pruned save's masks file goes: the zeros are in the weights.
    with saving_into(folder, owned=(MASKS_FILENAME,)) as partial:
        vanilla.save_pretrained(partial)
        create_pruning_model_card(model, vanilla=True, **card_kwargs).save(partial / "README.md")
    return folder
