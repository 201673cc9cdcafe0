"""Which weights are pruned, on a registered family or on any ``nn.Module``, and how they are grouped."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .layout import PRUNABLE_TYPES, input_dims, is_prunable
from .registry import find_adapter


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"`target_modules` entry {pattern!r} is not a valid regular expression: {err}."
        ) from err


def _output_layer(model: nn.Module, prunable: dict[str, nn.Module]) -> str | None:
    """The name of the model's output layer: its output embeddings, else the last prunable module."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in prunable.items():
        if module is output:
            return name
    return next(reversed(prunable), None)


def find_target_modules(
    model: nn.Module, target_modules: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The modules whose weights are pruned, by qualified name, in ``model.named_modules()`` order.

    - ``target_modules`` given: the ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d`` modules whose
      qualified name a pattern matches (``re.search``).
    - A model of a registered family: every layer of every prunable structure of every block (attention
      q/k/v or fused qkv and output projections, FFN linears): never embeddings, norms or the classifier.
    - Any other ``nn.Module``: every ``nn.Linear``/``Conv1D``/``nn.Conv*d`` except the output layer, which
      is the model's output embeddings when it declares them (``get_output_embeddings``), else the last
      such module in ``named_modules()`` order (a CNN's classifier). Pass ``target_modules`` to choose.

    Args:
        model (`nn.Module`): any model.
        target_modules (`Sequence[str]`, *optional*): regular expressions selecting the modules instead.

    Raises:
        ValueError: no module matches, or a pattern is not a valid regular expression.
        TypeError: `target_modules` is a single string instead of a sequence of them.

    Example:
        >>> from torch import nn
        >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        >>> list(find_target_modules(cnn))
        ['0']
        >>> list(find_target_modules(cnn, ["0", "3"]))
        ['0', '3']
    """
    prunable = {name: m for name, m in model.named_modules() if is_prunable(m)}
    if target_modules is None:
        adapter = find_adapter(model)
        if adapter is not None:
            wanted = {
                id(adapter.module(model, layer, path))
                for layer in range(len(adapter.blocks(model)))
                for structure in adapter.structures
                for path in structure.paths()
            }
            return {name: module for name, module in prunable.items() if id(module) in wanted}
        output = _output_layer(model, prunable)
        found = {name: module for name, module in prunable.items() if name != output}
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no {', '.join(t.__name__ for t in PRUNABLE_TYPES)} module "
                f"besides its output layer {output!r}: name the modules with `target_modules`."
            )
        return found
    if isinstance(target_modules, str):
        raise TypeError(
            f"`target_modules` must be a sequence of regular expressions, got the string {target_modules!r}; "
            f"wrap it in a list: [{target_modules!r}]."
        )
    patterns = [_compile(pattern) for pattern in target_modules]
    found = {name: module for name, module in prunable.items() if any(p.search(name) for p in patterns)}
    if not found:
        raise ValueError(
            f"`target_modules` {list(target_modules)} matched no "
            f"{', '.join(t.__name__ for t in PRUNABLE_TYPES)} "
            f"module of {type(model).__name__}; patterns are searched in qualified names such as "
            f"{list(prunable)[:3]}."
        )
    return found


def weight_input_dims(
    model: nn.Module, target_modules: Sequence[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Parameter name to the input dimensions of each target weight: the ``input_dims`` of N:M selection.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> weight_input_dims(model)["transformer.h.0.attn.c_attn.weight"]
        (0,)
    """
    return {f"{name}.weight": input_dims(m) for name, m in find_target_modules(model, target_modules).items()}


def weight_layer_groups(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, str]:
    """Parameter name to its layer key: the ``groups`` of ``scope="per_layer"`` selection.

    In a registered family the key is the block, ``"layer.<i>"``; a target outside every block, and every
    target of any other model, is a group of its own, keyed by its module name.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> groups = weight_layer_groups(model, ["layer.1.output.dense", "classifier"])
        >>> sorted(set(groups.values()))
        ['classifier', 'layer.1']
    """
    adapter = find_adapter(model)
    blocks = {id(b): i for i, b in enumerate(adapter.blocks(model))} if adapter is not None else {}
    prefixes = {f"{name}.": f"layer.{blocks[id(m)]}" for name, m in model.named_modules() if id(m) in blocks}
    return {
        f"{name}.weight": next((layer for prefix, layer in prefixes.items() if name.startswith(prefix)), name)
        for name in find_target_modules(model, target_modules)
    }
