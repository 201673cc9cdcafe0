"""Mask tuning (Kwon et al., 2022): rescale the kept units so each pruned block reproduces the original.

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

Least squares block by block cannot see what matters to the model's output: on a fine-tuned MiniLM it adds
about 2 points to a one-shot cut and takes 1 point from a cut made in rounds
(``benchmarks/structured_speed.py``). :func:`distill_unit_scales` fits every kept unit's scale at once
instead, by gradient descent on the KL divergence between the pruned and the unpruned model's outputs
(:func:`capture_teacher`), stopped when the divergence on held-out calibration batches stops falling.
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
from ..core.batches import all_reduce_mean, all_reduce_sum, frozen_for_probe, prepare_batch
from ..core.record import PruningRecord
from .importance import gate_probe

logger = logging.getLogger(__name__)
#: Scales outside this range are not applied (the least-squares problem was ill-posed).
MAX_SCALE = 10.0
#: Weight of ``||m - 1||²`` against the data term, relative to the mean diagonal of ``AᵀA``.
DAMPING = 1e-3
#: Outputs wider than this (a language model's vocabulary) are distilled on the teacher's most likely
#: entries and one bin for the rest, so the teacher's outputs take ``TOP_K + 1`` numbers a token.
TOP_K = 64


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


def _fold(module: nn.Module, scales: torch.Tensor, width: int) -> None:
    """Multiply each unit's input columns of ``module`` by its scale, in place (dtype kept)."""
    in_dim = weight_dims(module)[1]
    per_column = scales.repeat_interleave(width).to(module.weight.dtype)
    shape = [1, 1]
    shape[in_dim] = -1
    with torch.no_grad():
        module.weight.mul_(per_column.view(shape))


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
                _fold(adapter.module(model, site.layer, site.structure.output), scales, width)
                done += 1
                scale_sum += float(scales.mean())
            if layer < len(replay.blocks) - 1:
                replay.advance(layer)
    return {
        "prune/mask_tuning_layers": float(done),
        "prune/mask_tuning_skipped": float(skipped),
        "prune/mask_tuning_mean_scale": scale_sum / done if done else 1.0,
    }


@dataclass(frozen=True)
class Teacher:
    """The unpruned model's outputs on the calibration batches, as :func:`distill_unit_scales` needs them.

    ``log_probs[i]`` holds batch ``i``'s log-probabilities, one row per example (per real token for a
    sequence of outputs); rows wider than :data:`TOP_K` keep their ``TOP_K`` largest entries (``indices[i]``)
    and the log of the rest's mass. For one output (regression) they are the raw outputs.
    """

    log_probs: list[torch.Tensor]
    indices: list[torch.Tensor | None]


def _output_rows(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's ``logits`` on ``batch`` as float32 rows: one per example, or per real token."""
    inputs = prepare_batch(model, {k: v for k, v in batch.items() if k != "labels"})
    outputs = model(**inputs)
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "`mask_tuning_method='distillation'` needs a model that returns `logits` (got "
            f"{type(outputs).__name__}); use `mask_tuning_method='least_squares'`."
        )
    mask = inputs.get("attention_mask")
    if logits.dim() == 3 and isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]:
        return logits[mask.bool()].float()
    return logits.reshape(-1, logits.shape[-1]).float()


def coarse(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log_probs`` at ``indices`` with a last column for the log of the remaining mass."""
    top = log_probs.gather(-1, indices)
    top_mass = top.logsumexp(-1, keepdim=True).clamp_max(-1e-7)  # log of the top entries' mass, below 0
    return torch.cat([top, torch.log(-torch.expm1(top_mass))], dim=-1)


def capture_teacher(
    model: nn.Module, batches: list[Mapping[str, Any]], show_progress: bool = True
) -> Teacher:
    """Run the model (before its cut) and keep its outputs on ``batches`` for :func:`distill_unit_scales`.

    Args:
        model (`nn.Module`): the model before pruning; it must return ``logits``.
        batches (`list[Mapping]`): the calibration batches (given again to :func:`distill_unit_scales`).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `Teacher`: the outputs, at most ``TOP_K + 1`` numbers per row.
    """
    log_probs, indices = [], []
    with frozen_for_probe(model), torch.no_grad():
        for batch in tqdm(batches, desc="Mask tuning: original outputs", disable=not show_progress):
            rows = _output_rows(model, batch)
            chosen = None
            if rows.shape[-1] > 1:
                rows = rows.log_softmax(-1)
                if rows.shape[-1] > TOP_K + 1:
                    chosen = rows.topk(TOP_K, dim=-1).indices
                    rows = coarse(rows, chosen)
            log_probs.append(rows)
            indices.append(chosen)
    return Teacher(log_probs, indices)


def _divergence(model: nn.Module, batch: Mapping[str, Any], teacher: Teacher, index: int) -> torch.Tensor:
    """Mean KL divergence of the model's outputs on ``batch`` from the teacher's (squared error for one
    output)."""
    rows, wanted, chosen = _output_rows(model, batch), teacher.log_probs[index], teacher.indices[index]
    if rows.shape[-1] == 1:
        return (rows - wanted).square().mean()
    rows = rows.log_softmax(-1)
    if chosen is not None:
        rows = coarse(rows, chosen)
    return (wanted.exp() * (wanted - rows)).sum(-1).mean()


def distill_unit_scales(
    model: nn.Module,
    batches: list[Mapping[str, Any]],
    teacher: Teacher,
    structures: Iterable[str] | None = None,
    learning_rate: float = 1e-2,
    max_epochs: int = 10,
    patience: int = 2,
    show_progress: bool = True,
) -> dict[str, float]:
    """Fit one scale per kept unit by distillation from the unpruned model, and fold it into the weights.

    The scales start at 1 and are the gates of :class:`hf_gradprune.UnitGates`: Adam (``learning_rate``)
    lowers the KL divergence between the pruned model's outputs and the teacher's on the first three
    quarters of ``batches``, epoch after epoch, and the scales of the epoch with the lowest divergence on
    the last quarter are kept (a single batch is used for both). Stops after ``patience`` epochs without
    improvement or after ``max_epochs``. Only the scales change, so the model cannot drift far from the
    original; under ``torch.distributed`` gradients and divergences are averaged, so every rank folds the
    same scales.

    Args:
        model (`nn.Module`): the pruned model.
        batches (`list[Mapping]`): the batches :func:`capture_teacher` ran on, in the same order.
        teacher (`Teacher`): what :func:`capture_teacher` returned for the unpruned model.
        structures (`Iterable[str]`, *optional*): the structures to rescale (default: all).
        learning_rate (`float`, *optional*, defaults to 1e-2): Adam's step size.
        max_epochs (`int`, *optional*, defaults to 10): passes over the fitting batches at most.
        patience (`int`, *optional*, defaults to 2): epochs without a better held-out divergence before
            stopping.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over epochs.

    Returns:
        `dict[str, float]`: ``prune/mask_tuning_divergence_before`` and ``_after`` (held out),
        ``prune/mask_tuning_epochs`` (the epoch kept, 0 when none helped) and
        ``prune/mask_tuning_mean_scale``.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import prune_units
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99)).eval()
        >>> batches = [{"input_ids": torch.randint(1, 99, (8, 12))} for _ in range(4)]
        >>> teacher = capture_teacher(model, batches, show_progress=False)
        >>> _ = prune_units(model, {"heads": {0: [0, 1]}, "ffn": {1: list(range(20))}})
        >>> report = distill_unit_scales(model, batches, teacher, show_progress=False)
        >>> report["prune/mask_tuning_divergence_after"] <= report["prune/mask_tuning_divergence_before"]
        True
    """
    if len(teacher.log_probs) != len(batches):
        raise ValueError(
            f"`teacher` holds outputs of {len(teacher.log_probs)} batches, `batches` has {len(batches)}: "
            "give the batches `capture_teacher` ran on."
        )
    adapter = get_adapter(model)
    names = list(structures) if structures is not None else [s.name for s in adapter.structures]
    held = max(1, len(batches) // 4) if len(batches) > 1 else 0
    fitting = list(range(len(batches) - held))
    held_out = list(range(len(batches) - held, len(batches))) if held else fitting
    with gate_probe(model, names) as gates:
        scales = [g.gates for g in gates]
        optimizer = torch.optim.Adam(scales, lr=learning_rate)

        def held_out_divergence() -> float:
            with torch.no_grad():
                total = torch.stack([_divergence(model, batches[i], teacher, i) for i in held_out]).sum()
            return float(all_reduce_mean(total.double())) / len(held_out)

        before = best = held_out_divergence()
        kept, best_epoch = [s.detach().clone() for s in scales], 0
        for epoch in tqdm(range(1, max_epochs + 1), desc="Mask tuning", disable=not show_progress):
            for index in fitting:
                optimizer.zero_grad()
                _divergence(model, batches[index], teacher, index).backward()
                for scale in scales:
                    if scale.grad is not None:  # None on every rank alike: a structure with no unit left
                        all_reduce_mean(scale.grad)
                optimizer.step()
            divergence = held_out_divergence()
            if divergence < best:
                best, best_epoch, kept = divergence, epoch, [s.detach().clone() for s in scales]
            elif epoch - best_epoch >= patience:
                break
    record = PruningRecord.from_config(model.config)
    chosen = []
    for gate, values in zip(gates, kept, strict=True):
        width = adapter.unit_width(gate.structure, model.config)
        for layer in range(values.shape[0]):
            units = record.kept(gate.structure.name, layer, values.shape[1])
            if units:
                layer_scales = values[layer, units]
                _fold(adapter.module(model, layer, gate.structure.output), layer_scales, width)
                chosen.append(layer_scales)
    return {
        "prune/mask_tuning_divergence_before": before,
        "prune/mask_tuning_divergence_after": best,
        "prune/mask_tuning_epochs": float(best_epoch),
        "prune/mask_tuning_mean_scale": float(torch.cat(chosen).mean()) if chosen else 1.0,
    }
