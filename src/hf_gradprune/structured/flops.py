"""Multiply-adds of the prunable structures, counted from the adapter's declaration and the layer shapes.

The cost of one prunable unit (a head, a key/value group of heads, an FFN neuron) per token is the
weights it owns in its row layers (``in_features`` times its rows) and in the output layer
(``out_features`` times its columns), plus, for attention heads, the ``2 * seq_len * head_dim``
multiply-adds of the attention scores and the weighted sum of values. The block FLOPs of a model are
twice the multiply-adds of every unit still present, for a sequence of ``seq_len`` tokens: the
attention and FFN of every block, which is what structured pruning shrinks (embeddings, norms and the
output layer are left out).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapters import UNIT, get_adapter, weight_dims
from ..core.record import PruningRecord
from .selection import select_units_under_budget

KERNEL_MULTIPLE = 64
"""FFN neurons leave a layer in blocks of this many under a FLOPs budget, when the FFN width is a multiple
of it: dense kernels run layers of such widths at full speed (a layer cut to 39 neurons does not)."""


def unit_macs(model: nn.Module, seq_len: int) -> dict[str, int]:
    """Structure name to the multiply-adds per token of one prunable unit (a whole key/value group).

    Args:
        model (`nn.Module`): a model of a registered family (pruned or not: a unit's cost does not change).
        seq_len (`int`): the sequence length the attention scores are counted for.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> unit_macs(model, seq_len=16)  # head: 3 * 32 * 8 + 32 * 8 + 2 * 16 * 8; neuron: 32 + 32
        {'heads': 1280, 'ffn': 64}
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive number of tokens, got {seq_len}.")
    adapter = get_adapter(model)
    config = model.config
    costs = {}
    for structure in adapter.structures:
        width = adapter.unit_width(structure, config)
        group = adapter.group_size(structure, config)
        macs = 0
        for rows in structure.rows:
            module = adapter.module(model, 0, rows.path)
            in_features = module.weight.shape[weight_dims(module)[1]]
            macs += sum(in_features * width * (group if s == UNIT else 1) for s in rows.segments)
        output = adapter.module(model, 0, structure.output)
        macs += output.weight.shape[weight_dims(output)[0]] * width * group
        macs += structure.context_macs * seq_len * width * group
        costs[structure.name] = macs
    return costs


def block_flops(model: nn.Module, seq_len: int, original: bool = False) -> int:
    """FLOPs (2 x multiply-adds) of the attention and FFN of every block for one sequence of ``seq_len``.

    Args:
        model (`nn.Module`): a model of a registered family.
        seq_len (`int`): tokens in the sequence.
        original (`bool`, *optional*, defaults to `False`): count the unpruned model instead (its removed
            layers included).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_gradprune import prune_units
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37, vocab_size=99))
        >>> dense = block_flops(model, 16)
        >>> _ = prune_units(model, {"heads": {0: [0, 1]}, "ffn": {1: list(range(37))}}, allow_empty=True)
        >>> round(block_flops(model, 16) / dense, 3)  # layer 0: half its heads; layer 1: no FFN
        0.671
    """
    return 2 * seq_len * sum(layer_macs(model, unit_macs(model, seq_len), original))


def neuron_multiples(model: nn.Module, ffn_multiple_of: int | None = None) -> dict[str, int]:
    """The ``multiple_of`` of :func:`select_units_for_flops`: ``ffn_multiple_of`` for every structure of
    one-row units (neurons), by default :data:`KERNEL_MULTIPLE` when the unpruned width is a multiple of it,
    else 1.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> neuron_multiples(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                                       intermediate_size=128, vocab_size=99)))
        {'ffn': 64}
    """
    if ffn_multiple_of is not None and ffn_multiple_of < 1:
        raise ValueError(f"`ffn_multiple_of` must be >= 1, got {ffn_multiple_of}.")
    adapter = get_adapter(model)
    multiples = {}
    for structure in adapter.structures:
        if adapter.unit_width(structure, model.config) == 1:
            width = adapter.num_units(structure, model.config)
            default = KERNEL_MULTIPLE if width % KERNEL_MULTIPLE == 0 else 1
            multiples[structure.name] = default if ffn_multiple_of is None else ffn_multiple_of
    return multiples


def select_units_for_flops(
    model: nn.Module,
    importance: Mapping[str, torch.Tensor],
    target_ratio: float,
    seq_len: int = 128,
    min_units_per_layer: int | Mapping[str, int] = 1,
    multiple_of: Mapping[str, int] | None = None,
    uniform: bool = False,
    final_ratio: float | None = None,
) -> dict[str, dict[int, list[int]]]:
    """Heads and FFN neurons (and whole layers) to remove so that the block FLOPs fall to ``target_ratio`` of
    the original.

    Units of every scored structure are ranked together by importance per multiply-add they cost
    (:func:`hf_gradprune.structured.selection.select_units_under_budget`), so the scores must share one scale:
    the Fisher information of the gates (``compute_unit_importance(..., accumulate="fisher")``, not
    normalised). With ``"layers"`` scored too, each layer is a candidate that costs its multiply-adds as it
    stands.

    Args:
        model (`nn.Module`): a model of a registered family, possibly pruned already.
        importance (`Mapping[str, torch.Tensor]`): structure name to ``(num_layers, num_units)`` scores
            (``"layers"``: ``(num_layers,)``).
        target_ratio (`float`): the fraction in (0, 1] of the original block FLOPs to keep.
        seq_len (`int`, *optional*, defaults to 128): the sequence length FLOPs are counted at.
        min_units_per_layer (`int` or `Mapping[str, int]`, *optional*, defaults to 1): units (groups) of each
            structure every layer keeps.
        multiple_of (`Mapping[str, int]`, *optional*): structure name to the block size its units leave a
            layer in (:func:`neuron_multiples` gives the kernel-friendly default; none: 1).
        uniform (`bool`, *optional*, defaults to `False`): remove as many of each structure from every layer.
        final_ratio (`float`, *optional*): when this is one round of a cut to ``final_ratio``, a whole layer
            may take the FLOPs below ``target_ratio`` down to it (default: ``target_ratio``).

    Returns:
        `dict[str, dict[int, list[int]]]`: the ``units_to_prune`` of :func:`hf_gradprune.prune_units` (empty
        when the model is already at or below the target).
    """
    if not 0.0 < target_ratio <= 1.0:
        raise ValueError(f"`target_ratio` must be in (0, 1], got {target_ratio}.")
    adapter = get_adapter(model)
    costs = unit_macs(model, seq_len)
    per_layer = layer_macs(model, costs)
    # The block FLOPs as block_flops counts them, from the costs computed once.
    current = 2 * seq_len * sum(per_layer)
    original = 2 * seq_len * sum(layer_macs(model, costs, original=True))
    excess = current - target_ratio * original
    if excess <= 0:
        return {}
    final_excess = (
        current - (target_ratio if final_ratio is None else min(final_ratio, target_ratio)) * original
    )
    groups = {s.name: adapter.group_size(s, model.config) for s in adapter.structures}
    # A unit of a block costs the same in every layer; a whole layer what its units left cost.
    scored = [s for s in adapter.prunable if s.name in importance]
    return select_units_under_budget(
        importance,
        {s.name: per_layer if s.spans_layers else costs[s.name] for s in scored},
        excess / (2 * seq_len),
        groups=groups,
        min_units_per_layer=min_units_per_layer,
        multiple_of=multiple_of,
        uniform=uniform,
        layer_budget=final_excess / (2 * seq_len),
    )


def check_flops_target(
    model: nn.Module,
    target_ratio: float,
    seq_len: int,
    min_units_per_layer: int | Mapping[str, int],
    multiple_of: Mapping[str, int] | None = None,
    uniform: bool = False,
    structures: Sequence[str] | None = None,
    argument: str = "target_ratio",
) -> None:
    """Raise a ``ValueError`` naming ``target_ratio`` (as ``argument``), before anything is cut, when no
    choice of units of ``structures`` (default: every structure of a block) under the constraints reaches
    it; what can go does not depend on the scores, so the check selects on equal ones."""
    adapter = get_adapter(model)
    record = PruningRecord.from_config(model.config)
    num_layers = len(adapter.blocks(model))
    importance = {}
    for name in structures if structures is not None else [s.name for s in adapter.structures]:
        structure = adapter.structure(name)
        scores = torch.ones(structure.score_shape(num_layers, model.config))
        for layer, units in ({} if structure.spans_layers else record.pruned.get(name, {})).items():
            scores[layer, units] = float("nan")
        importance[name] = scores
    try:
        select_units_for_flops(
            model, importance, target_ratio, seq_len, min_units_per_layer, multiple_of, uniform
        )
    except ValueError as error:
        raise ValueError(f"`{argument}` {target_ratio} cannot be reached: {error}") from None


def layer_macs(model: nn.Module, costs: Mapping[str, int], original: bool = False) -> list[int]:
    """Multiply-adds per token of every layer as it stands (``original``: of every layer of the unpruned
    model, removed ones included): its units of each structure at ``costs`` (:func:`unit_macs`) per unit."""
    adapter = get_adapter(model)
    record = PruningRecord.from_config(model.config)
    num_layers = len(adapter.blocks(model)) + (len(record.removed_layers) if original else 0)
    macs = [0] * num_layers
    for structure in adapter.structures:
        num_units = adapter.num_units(structure, model.config)
        group = adapter.group_size(structure, model.config)
        for layer in range(num_layers):
            kept = num_units if original else len(record.kept(structure.name, layer, num_units))
            macs[layer] += kept // group * costs[structure.name]
    return macs


def flops_ratio(model: nn.Module, seq_len: int) -> float:
    """``model``'s block FLOPs at ``seq_len`` tokens as a fraction of its unpruned ones."""
    return block_flops(model, seq_len) / block_flops(model, seq_len, original=True)


def flops_in_rounds(
    model: nn.Module,
    target_ratio: float,
    seq_len: int,
    min_units_per_layer: int | Mapping[str, int],
    rounds: int,
    multiple_of: Mapping[str, int] | None = None,
    uniform: bool = False,
) -> Callable[[Mapping[str, torch.Tensor], int], dict[str, dict[int, list[int]]]]:
    """The ``choose`` of :func:`hf_gradprune.prune_in_rounds` for a FLOPs budget: round ``index`` of
    ``rounds`` takes the block FLOPs an equal step from where they are now towards ``target_ratio``
    (:func:`select_units_for_flops` on that round's scores)."""
    start = flops_ratio(model, seq_len)

    def choose(importance: Mapping[str, torch.Tensor], index: int) -> dict[str, dict[int, list[int]]]:
        ratio = start + (target_ratio - start) * (index + 1) / rounds
        return select_units_for_flops(
            model, importance, ratio, seq_len, min_units_per_layer, multiple_of, uniform, target_ratio
        )

    return choose


@torch.inference_mode()
def measure_speedup(
    reference: nn.Module, model: nn.Module, batch: Mapping[str, Any], rounds: int = 5, warmup: int = 1
) -> float:
    """Measured forward speed-up of ``model`` over ``reference`` on ``batch``: the ratio of the median
    times of ``rounds`` interleaved calls (the order alternating), after ``warmup`` calls of each.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(64, 64)
        >>> measure_speedup(layer, layer, {"input": torch.randn(8, 64)}) > 0
        True
    """
    if rounds < 1:
        raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    models = (reference, model)
    for candidate in models:
        candidate.eval()
        for _ in range(warmup):
            candidate(**inputs)
    times: tuple[list[float], list[float]] = ([], [])
    for round_index in range(rounds):
        for which in (0, 1) if round_index % 2 == 0 else (1, 0):
            start = time.perf_counter()
            models[which](**inputs)
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])
