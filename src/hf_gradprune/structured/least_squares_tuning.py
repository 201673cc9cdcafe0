"""Mask tuning by least squares (Kwon et al., 2022): rescale the kept units so each pruned block reproduces
the original (``mask_tuning_method='least_squares'``; the default fit, by distillation, and the folding of the
scales into the weights are in :mod:`hf_gradprune.structured.mask_tuning`).

After a structural cut every structure's output layer (the attention output projection, the FFN down
projection) sums the contributions of fewer units. Layer by layer, in forward order, the kept units get one
scale each, the least-squares solution of

    min_m  Σ_tokens || Σ_u m_u · W_u a_u  -  (y_orig + x_orig - x_pruned - bias) ||²  +  λ ||m - 1||²

where ``a_u`` is unit ``u``'s input columns of the output layer and ``W_u`` its weight columns in the pruned
model, ``y_orig`` the original output layer's output and ``x`` the residual stream it is added to (from the
unpruned model, and from the pruned model whose earlier layers are already rescaled). Matching the sum
``y + x`` lets a layer make up for the errors of the layers before it. Blocks are replayed one at a time
from the hidden states of the blocks before them, so tuning every layer costs about three passes over the
calibration batches, not one per layer. The small ``λ`` (``DAMPING`` times
the mean diagonal of ``AᵀA``) keeps scales the data do not determine near 1. The scales are folded into the
output layer's weight columns, so the model has no new parameter. The normal equations are accumulated
over tokens: with ``S = Σ a aᵀ`` and ``G = WᵀW``, ``AᵀA`` is the block sum of ``G ∘ S``, so memory stays
at two (units × width)² matrices per layer whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapters import ArchitectureAdapter, Structure, get_adapter, weight_dims
from ..core.batches import all_reduce_sum, frozen_for_probe, prepare_batch
from ..core.record import PruningRecord
from .mask_tuning import fold_unit_scales

logger = logging.getLogger(__name__)
#: Scales outside this range are not applied (the least-squares problem was ill-posed).
MAX_SCALE = 10.0
#: Weight of ``||m - 1||²`` against the data term, relative to the mean diagonal of ``AᵀA``.
DAMPING = 1e-3


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


@dataclass(frozen=True)
class _Site:
    layer: int
    structure: Structure


def _first_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))


def _sites(model: nn.Module, adapter: ArchitectureAdapter) -> list[_Site]:
    return [_Site(layer, s) for layer in range(len(adapter.blocks(model))) for s in adapter.structures]


def _run(model: nn.Module, batch: Mapping[str, Any]) -> None:
    with contextlib.suppress(_Stop):
        model(**prepare_batch(model, batch))


def _output_matrix(module: nn.Module) -> torch.Tensor:
    """The output layer's weight as (out, in) in float64."""
    weight = module.weight.detach().double()
    return weight.t() if weight_dims(module)[0] == 1 else weight


def capture_targets(
    model: nn.Module, batches: list[Mapping[str, Any]], show_progress: bool = True
) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Run the model (before its cut) and keep, per layer and structure, ``y + x`` for every batch.

    Args:
        model (`nn.Module`): the model before pruning, of a registered family.
        batches (`list[Mapping]`): the calibration batches (given again to :func:`rescale_units`).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict[tuple[int, str], list[torch.Tensor]]`: ``(layer, structure name)`` to one float32 tensor per
        batch of the output layer's output plus its residual input.
    """
    adapter = get_adapter(model)
    targets: dict[tuple[int, str], list[torch.Tensor]] = {}
    residuals: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep_residual(key, _module, args, kwargs):
        residuals[key] = _first_input(args, kwargs).detach()

    def keep_target(key, _module, _args, output):
        targets.setdefault(key, []).append((output.detach() + residuals.pop(key)).float())

    try:
        for site in _sites(model, adapter):
            key = (site.layer, site.structure.name)
            residual = adapter.module(model, site.layer, site.structure.residual)
            output = adapter.module(model, site.layer, site.structure.output)
            handles.append(
                residual.register_forward_pre_hook(functools.partial(keep_residual, key), with_kwargs=True)
            )
            handles.append(output.register_forward_hook(functools.partial(keep_target, key)))
        with frozen_for_probe(model), torch.no_grad():
            for batch in tqdm(batches, desc="Mask tuning: original outputs", disable=not show_progress):
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return targets


class _BlockReplay:
    """Runs one block at a time on every calibration batch, from the hidden states the blocks before it
    produced: one pass over the model in all, however many layers are tuned.

    The arguments of every block's call (attention masks, position embeddings) are recorded in one forward
    of the model; the hidden states are then carried from block to block.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, batches: list[Mapping[str, Any]]):
        self.blocks = adapter.blocks(model)
        self.calls: list[list[tuple[tuple, dict]]] = []
        recorded: list[tuple[tuple, dict]] = []

        def record(_module, args, kwargs):
            recorded.append(((None, *args[1:]), kwargs))  # the hidden states are carried, not recorded

        def first(_module, args, kwargs):
            self.hidden.append(_first_input(args, kwargs).detach())

        self.hidden: list[torch.Tensor] = []
        handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in self.blocks]
        handles.append(self.blocks[0].register_forward_pre_hook(first, with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in batches:
                    recorded = []
                    _run(model, batch)
                    self.calls.append(recorded)
        finally:
            for handle in handles:
                handle.remove()

    def run(self, layer: int, index: int) -> torch.Tensor:
        """Block ``layer`` on batch ``index``'s hidden states."""
        (_, *rest), kwargs = self.calls[index][layer]
        output = self.blocks[layer](self.hidden[index], *rest, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def advance(self, layer: int) -> None:
        """Carry every batch's hidden states through block ``layer``."""
        with torch.no_grad():
            self.hidden = [self.run(layer, index).detach() for index in range(len(self.hidden))]


def _normal_equations(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    site: _Site,
    replay: _BlockReplay,
    batches: list[Mapping[str, Any]],
    targets: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AᵀA, Aᵀb)`` of one layer's least-squares problem, over the (unpadded) tokens of ``batches``."""
    output = adapter.module(model, site.layer, site.structure.output)
    residual = adapter.module(model, site.layer, site.structure.residual)
    weight = _output_matrix(output)
    bias = output.bias.detach().double() if output.bias is not None else 0.0
    columns = weight.shape[1]
    gram = torch.zeros(columns, columns, dtype=torch.float64, device=weight.device)
    cross = torch.zeros(columns, dtype=torch.float64, device=weight.device)
    state: dict[str, torch.Tensor] = {}

    def keep_residual(_module, args, kwargs):
        state["x"] = _first_input(args, kwargs).detach()

    def accumulate(_module, args):
        nonlocal gram, cross
        inputs = args[0].detach().double().reshape(-1, columns)
        wanted = (state["target"].double() - state.pop("x").double()).reshape(-1, weight.shape[0]) - bias
        tokens = state.get("tokens")
        if tokens is not None and tokens.numel() == inputs.shape[0]:
            inputs, wanted = inputs[tokens], wanted[tokens]
        gram += inputs.t() @ inputs
        cross += (inputs * (wanted @ weight)).sum(dim=0)
        raise _Stop

    handles = [
        residual.register_forward_pre_hook(keep_residual, with_kwargs=True),
        output.register_forward_pre_hook(accumulate),
    ]
    try:
        with torch.no_grad():
            for index, (batch, target) in enumerate(zip(batches, targets, strict=True)):
                state["target"] = target
                mask = batch.get("attention_mask")
                state["tokens"] = mask.reshape(-1).bool().to(weight.device) if mask is not None else None
                with contextlib.suppress(_Stop):
                    replay.run(site.layer, index)
    finally:
        for handle in handles:
            handle.remove()
    all_reduce_sum(gram)  # every process solves the same problem, so the scales agree across ranks
    all_reduce_sum(cross)
    width = adapter.unit_width(site.structure, model.config)
    units = columns // width
    blocks = (weight.t() @ weight * gram).reshape(units, width, units, width).sum(dim=(1, 3))
    return blocks, cross.reshape(units, width).sum(dim=1)


def _solve(ata: torch.Tensor, atb: torch.Tensor) -> torch.Tensor | None:
    """Least squares with a small pull towards scale 1 (no change) in the directions the data leave
    undetermined; ``None`` when the scales are not finite or out of range."""
    damping = DAMPING * ata.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(ata.shape[0], dtype=ata.dtype, device=ata.device)
    scales = torch.linalg.solve(ata + damping * eye, atb + damping)
    if not torch.isfinite(scales).all() or scales.abs().max() > MAX_SCALE:
        return None
    return scales


def rescale_units(
    model: nn.Module,
    batches: list[Mapping[str, Any]],
    targets: dict[tuple[int, str], list[torch.Tensor]],
    structures: Iterable[str] | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Fold least-squares scales of the kept units into the output layers, layer by layer (mask tuning).

    Args:
        model (`nn.Module`): the pruned model.
        batches (`list[Mapping]`): the batches :func:`capture_targets` ran on, in the same order.
        targets (`dict`): what :func:`capture_targets` returned for the unpruned model.
        structures (`Iterable[str]`, *optional*): the structures to rescale (default: all). Layers before
            the first cut are left alone: they reproduce the original exactly.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over layers.

    Returns:
        `dict[str, float]`: ``prune/mask_tuning_layers`` (layers rescaled), ``prune/mask_tuning_skipped``
        (ill-posed ones left as they were) and ``prune/mask_tuning_mean_scale``.
    """
    adapter = get_adapter(model)
    record = PruningRecord.from_config(model.config)
    wanted = set(structures) if structures is not None else {s.name for s in adapter.structures}
    sites = _sites(model, adapter)
    first_cut = next(
        (i for i, s in enumerate(sites) if record.removed(s.structure.name, s.layer)), len(sites)
    )
    tuned = [s for s in sites[first_cut:] if s.structure.name in wanted]
    done, skipped, scale_sum = 0, 0, 0.0
    with frozen_for_probe(model):
        replay = _BlockReplay(model, adapter, batches)
        for layer in tqdm(range(len(replay.blocks)), desc="Mask tuning", disable=not show_progress):
            for site in (s for s in tuned if s.layer == layer):
                num_units = adapter.num_units(site.structure, model.config)
                if not record.kept(site.structure.name, site.layer, num_units):
                    continue
                targets_of_site = targets[site.layer, site.structure.name]
                ata, atb = _normal_equations(model, adapter, site, replay, batches, targets_of_site)
                scales = _solve(ata, atb)
                if scales is None:
                    skipped += 1
                    logger.warning(
                        "Mask tuning left layer %d (%s) as it was: its least-squares scales are ill-posed.",
                        site.layer,
                        site.structure.name,
                    )
                    continue
                width = adapter.unit_width(site.structure, model.config)
                fold_unit_scales(adapter.module(model, site.layer, site.structure.output), scales, width)
                done += 1
                scale_sum += float(scales.mean())
            if layer < len(replay.blocks) - 1:
                replay.advance(layer)
    return {
        "prune/mask_tuning_layers": float(done),
        "prune/mask_tuning_skipped": float(skipped),
        "prune/mask_tuning_mean_scale": scale_sum / done if done else 1.0,
    }
