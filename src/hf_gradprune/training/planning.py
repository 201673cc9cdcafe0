"""The plan of a run: at which steps cuts fall and how much of each structure and of the weights each takes,
from ``PruningArguments``; the callback executes it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..core.adapters import Structure, get_adapter
from ..structured.flops import check_flops_target, flops_in_rounds, neuron_multiples
from ..structured.importance import normalize_per_layer
from ..structured.selection import select_units_to_prune
from ..weights.sparsity import sparsity_at_step
from .arguments import PruningArguments

#: Units to remove in a round: structure name to layer to unit indices (``"layers"``: whole layers).
Choice = dict[str, dict[int, list[int]]]


def share(step: int, steps: list[int], target: float) -> int:
    """The part of ``target`` (spread evenly over ``steps``) that falls on ``step``."""
    done = steps.index(step)
    return round(target * (done + 1) / len(steps)) - round(target * done / len(steps))


def unit_counts(model: nn.Module, names: Iterable[str]) -> list[tuple[Structure, int]]:
    """The structures called ``names`` in ``model``'s family, each with its units (groups) per layer in the
    unpruned model."""
    adapter = get_adapter(model)
    return [
        (structure, adapter.num_units(structure, model.config) // adapter.group_size(structure, model.config))
        for structure in adapter.structures
        if structure.name in names
    ]


class PruningPlan:
    """What ``args`` ask for, step by step: the structural cuts (whole layers, units by count or fraction, or
    a FLOPs budget, spread over ``--prune_steps`` and made in ``--prune_rounds``) and the weight sparsity
    (at once or along a ramp).

    Args:
        args (`PruningArguments`): the run's pruning arguments.

    Example:
        >>> plan = PruningPlan(PruningArguments(prune_heads_per_layer=3, prune_steps="0,10"))
        >>> [plan.units_to_remove("heads", step, 12) for step in (0, 5, 10)]
        [2, None, 1]
    """

    def __init__(self, args: PruningArguments):
        self.args = args

    def check_structures(self, model: nn.Module) -> None:
        """Refuse, before anything is cut, a model of no registered family, a structure the flags name that
        ``model``'s family does not have (the error lists the family's structures), and whole layers asked
        by a fraction of units per layer."""
        args = self.args
        adapter = get_adapter(model)
        if args.prunes_by_flops:
            for name in args.flops_structures:
                adapter.structure(name)
            return
        for name in args.unit_structures:
            if adapter.structure(name).spans_layers:
                raise ValueError(
                    f"`--prune_units_* {name}=...` asks for units in each layer, and {name!r} are whole "
                    "layers: remove them with `--prune_layers`."
                )

    def structure_step(self, step: int) -> bool:
        """Whether a structural cut falls on ``step``."""
        return self.args.prunes_structures and step in self.args.prune_step_list

    def layers_to_remove(self, step: int) -> int:
        """Whole layers ``--prune_layers`` removes at ``step`` (0 off-schedule)."""
        args = self.args
        if not args.prunes_layers or not self.structure_step(step):
            return 0
        return share(step, args.prune_step_list, args.prune_layers)

    def units_to_remove(self, name: str, step: int, units_per_layer: int, num_layers: int = 1) -> int | None:
        """Units (key/value groups) of structure ``name`` to remove at ``step``, or ``None`` off-schedule or
        when no flag asks for them.

        The target of :attr:`PruningArguments.unit_targets` (a count per layer, a fraction of the
        ``units_per_layer`` of the original model in every layer, or a fraction of all of them across
        ``num_layers``) is spread evenly over the prune steps.
        """
        target = self.args.unit_targets.get(name)
        if target is None or not self.structure_step(step):
            return None
        return share(step, self.args.prune_step_list, target.total(units_per_layer, num_layers))

    def flops_ratio_at(self, step: int) -> float | None:
        """The fraction of the original block FLOPs to keep after ``step``, or ``None`` off-schedule."""
        args = self.args
        if not args.prunes_by_flops or not self.structure_step(step):
            return None
        steps = args.prune_step_list
        return 1.0 - (1.0 - args.target_flops_ratio) * (steps.index(step) + 1) / len(steps)

    def weight_sparsity_at(self, step: int, reached: float = 0.0) -> float | None:
        """The weight sparsity to reach at ``step`` from the ``reached`` one, or ``None`` when the weights are
        not pruned then."""
        args = self.args
        if not args.prunes_weights:
            return None
        if args.sparsity_schedule == "one_shot":
            return args.weight_sparsity if step == args.prune_step_list[0] else None
        start, end, every = (
            args.sparsity_schedule_start,
            args.sparsity_schedule_end,
            args.sparsity_schedule_frequency,
        )
        if step < start or step > end or ((step - start) % every and step != end):
            return None
        target = sparsity_at_step(step, args.weight_sparsity, start, end, args.sparsity_schedule, every)
        return target if target > reached else None

    def rounds(self, model: nn.Module, step: int) -> int:
        """Rounds of ``step``'s cut: ``--prune_rounds``, at most the units a layer loses in it."""
        args = self.args
        if args.prunes_by_flops:
            return args.prune_rounds
        largest = 1
        for structure, units in unit_counts(model, args.unit_targets):
            largest = max(largest, self.units_to_remove(structure.name, step, units) or 0)
        return max(1, min(args.prune_rounds, int(largest)))

    def min_units(self) -> dict[str, int]:
        """Units (groups) of each structure every layer keeps."""
        return {name: self.args.min_units_per_layer(name) for name in self.args.unit_structures}

    def chooser(
        self, model: nn.Module, step: int, rounds: int
    ) -> Callable[[Mapping[str, torch.Tensor], int], Choice]:
        """The ``choose`` of :func:`hf_gradprune.prune_in_rounds` for ``step``'s cut in ``rounds`` rounds: the
        FLOPs budget's (:func:`hf_gradprune.structured.flops.flops_in_rounds`), or the count and fraction
        flags'."""
        args = self.args
        if args.prunes_by_flops:
            multiples = neuron_multiples(model, args.prune_ffn_multiple_of)
            check_flops_target(
                model,
                args.target_flops_ratio,
                args.flops_seq_len,
                self.min_units(),
                multiples,
                args.uniform_per_layer,
                args.flops_structures,
                argument="--target_flops_ratio",
            )
            return flops_in_rounds(
                model,
                self.flops_ratio_at(step),
                args.flops_seq_len,
                self.min_units(),
                rounds,
                multiples,
                args.uniform_per_layer,
            )
        return functools.partial(self.units_in_round, model, step, rounds=rounds)

    def units_in_round(
        self, model: nn.Module, step: int, importance: Mapping[str, torch.Tensor], index: int, rounds: int
    ) -> Choice:
        """The units to remove in round ``index`` of the ``rounds`` rounds of ``step``'s cut, from the round's
        ``importance``, by the count and fraction flags."""
        targets = self.args.unit_targets
        adapter = get_adapter(model)
        num_layers = len(adapter.blocks(model))
        plan = {}
        for structure, units in unit_counts(model, targets):
            target = targets[structure.name]
            amount = self.units_to_remove(structure.name, step, units, num_layers)
            amount = share(index, [*range(rounds)], amount) if amount else 0
            if not amount:
                continue
            group = adapter.group_size(structure, model.config)
            scores = importance[structure.name]
            if target.across_layers:
                scores = normalize_per_layer(scores, target.normalize)
                # select_units_to_prune removes int(fraction * remaining) units: aim at mid-unit.
                remaining = int((~scores.isnan()).sum()) // group
                count = {"fraction": min((amount + 0.5) / remaining, 0.999999)}
            else:
                count = {"per_layer": amount}
            plan[structure.name] = select_units_to_prune(
                scores,
                min_units_per_layer=self.args.min_units_per_layer(structure.name),
                group=group,
                unit_name=structure.units_label if group == 1 else structure.group_label,
                **count,
            )
        return plan
