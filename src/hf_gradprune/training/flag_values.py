"""What the flags mean: the text of ``--prune_steps``, an N:M ``--sparsity_pattern`` and the ``name=value``
pairs of ``--prune_units_*``, the ``UnitTarget`` a count or fraction flag asks of a structure, and what a
run prunes (``FlagMeanings``, a base of ``PruningArguments``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.adapters.base import FFN, HEADS, LAYERS
from ..weights.criteria import needs_calibration
from ..weights.sparsity import parse_sparsity_pattern


@dataclass(frozen=True)
class UnitTarget:
    """How many units of one structure a run removes from within layers, and how they are ranked.

    Args:
        amount (`float`): units (key/value groups) to remove per layer when ``fraction`` is false, else the
            fraction of them to remove.
        fraction (`bool`): ``amount`` is a fraction of the units.
        across_layers (`bool`): the units are ranked across layers (scores normalised per layer by
            ``normalize``), not layer by layer.
        normalize (`str`): per-layer normalisation before ranking across layers.
    """

    amount: float
    fraction: bool
    across_layers: bool
    normalize: str = "none"

    def total(self, units_per_layer: int, num_layers: int) -> float:
        """Units to remove in all (across layers) or from every layer, of ``units_per_layer`` per layer."""
        if not self.fraction:
            return self.amount
        return self.amount * units_per_layer * (num_layers if self.across_layers else 1)


def parse_steps(value: str | int | list[int]) -> list[int]:
    """``--prune_steps`` (comma-separated, an int or a list of them) as sorted, distinct integers.

    Example:
        >>> parse_steps("500, 0")
        [0, 500]
    """
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        steps = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise ValueError(
            f"`--prune_steps` must be comma-separated non-negative integers such as 0,500, got {value!r}."
        ) from None
    if not steps or steps[0] < 0:
        raise ValueError(f"`--prune_steps` needs at least one step, all >= 0, got {value!r}.")
    return steps


def implied_sparsity(pattern: object) -> float | None:
    """The weight sparsity ``1 - N / M`` an N:M ``--sparsity_pattern`` implies; ``None`` for ``unstructured``
    or a pattern that is no pattern (which the argument checks refuse).

    Example:
        >>> implied_sparsity("2:4"), implied_sparsity("unstructured"), implied_sparsity("4:2")
        (0.5, None, None)
    """
    try:
        n_m = parse_sparsity_pattern(pattern) if isinstance(pattern, str) else None
    except ValueError:
        return None
    return 1 - n_m[0] / n_m[1] if n_m else None


def parse_unit_counts(text: str | None) -> dict[str, int]:
    """``--prune_units_per_layer`` as structure name to count (identifiers, each once, counts >= 0)."""
    pairs = _pairs("prune_units_per_layer", text, str.isdigit, "each count >= 0", "'ffn=64'")
    return {name: int(value) for name, value in pairs.items()}


def parse_unit_fractions(text: str | None) -> dict[str, float]:
    """``--prune_units_fraction`` as structure name to fraction (identifiers, each once, fractions in
    [0, 1))."""
    pairs = _pairs("prune_units_fraction", text, _is_fraction, "each fraction in [0, 1)", "'ffn=0.25'")
    return {name: float(value) for name, value in pairs.items()}


def _is_fraction(value: str) -> bool:
    try:
        return 0.0 <= float(value) < 1.0
    except ValueError:
        return False


def _pairs(
    flag: str, text: str | None, valid: Callable[[str], bool], rule: str, example: str
) -> dict[str, str]:
    """``name=value`` pairs of ``--flag``, comma-separated: each name an identifier given once, each value
    ``valid`` (a ``ValueError`` names the flag, the ``rule`` and an ``example`` otherwise)."""
    pairs: dict[str, str] = {}
    for pair in text.split(",") if text else []:
        name, _, value = (part.strip() for part in pair.partition("="))
        if not name.isidentifier() or name in pairs or not valid(value):
            raise ValueError(
                f"`--{flag}` must be name=value pairs, comma-separated, each structure once and {rule} "
                f"(e.g. {example}), got {text!r}."
            )
        pairs[name] = value
    return pairs


class FlagMeanings:
    """What the flags of :class:`PruningArguments` ask for, derived from its fields: which structures and
    weights a run prunes, and how."""

    @property
    def prune_step_list(self) -> list[int]:
        """``prune_steps`` as sorted integers."""
        return parse_steps(self.prune_steps)

    @property
    def flops_structures(self) -> list[str]:
        """``--prune_flops_structures`` as a list of names."""
        return [name.strip() for name in self.prune_flops_structures.split(",") if name.strip()]

    def _budget_cuts(self, name: str) -> bool:
        return self.prunes_by_flops and name in self.flops_structures

    @property
    def prunes_heads(self) -> bool:
        """Whether heads are to be removed (by count, fraction or FLOPs budget)."""
        return bool(self.prune_heads_per_layer) or bool(self.prune_heads_fraction) or self._budget_cuts(HEADS)

    @property
    def prunes_ffn(self) -> bool:
        """Whether FFN neurons are to be removed (by fraction or FLOPs budget)."""
        return bool(self.prune_ffn_fraction) or self._budget_cuts(FFN)

    @property
    def prunes_layers(self) -> bool:
        """Whether whole layers are to be removed."""
        return bool(self.prune_layers)

    @property
    def prunes_by_flops(self) -> bool:
        """Whether heads and neurons are chosen together under a FLOPs budget."""
        return self.target_flops_ratio is not None

    @property
    def unit_structures(self) -> list[str]:
        """The structures whose units within layers are to be removed (``"heads"``, ``"ffn"``): those of the
        FLOPs budget, or those the count and fraction flags name."""
        if self.prunes_by_flops:
            return [name for name in self.flops_structures if name != LAYERS]
        return list(self.unit_targets)

    def min_units_per_layer(self, name: str) -> int:
        """Units (groups) of structure ``name`` every layer keeps: ``--prune_min_heads_per_layer`` for heads,
        otherwise one, or none with ``--allow_empty_layers``."""
        if name == HEADS:
            return self.prune_min_heads_per_layer
        return 0 if self.allow_empty_layers else 1

    @property
    def unit_targets(self) -> dict[str, UnitTarget]:
        """Structure name to what the count and fraction flags ask of it (empty under a FLOPs budget, which
        chooses the amounts itself).

        Example:
            >>> from hf_gradprune import PruningArguments
            >>> PruningArguments(prune_heads_per_layer=2, prune_ffn_fraction=0.5).unit_targets["ffn"]
            UnitTarget(amount=0.5, fraction=True, across_layers=False, normalize='none')
        """
        targets = {}
        if self.prune_heads_per_layer:
            targets[HEADS] = UnitTarget(self.prune_heads_per_layer, False, False)
        elif self.prune_heads_fraction:
            targets[HEADS] = UnitTarget(
                self.prune_heads_fraction, True, not self.uniform_per_layer, self.head_importance_normalize
            )
        if self.prune_ffn_fraction:
            targets[FFN] = UnitTarget(self.prune_ffn_fraction, True, False)
        for name, count in self.unit_counts.items():
            if count:
                targets[name] = UnitTarget(count, False, False)
        for name, fraction in self.unit_fractions.items():
            if fraction:
                targets[name] = UnitTarget(fraction, True, False)
        return targets

    @property
    def unit_counts(self) -> dict[str, int]:
        """``--prune_units_per_layer`` as structure name to count (checked: identifiers, each once, >= 0).

        Example:
            >>> from hf_gradprune import PruningArguments
            >>> PruningArguments(prune_units_per_layer="ffn=64").unit_counts
            {'ffn': 64}
        """
        return parse_unit_counts(self.prune_units_per_layer)

    @property
    def unit_fractions(self) -> dict[str, float]:
        """``--prune_units_fraction`` as structure name to fraction (checked: identifiers, each once, in
        [0, 1)).

        Example:
            >>> from hf_gradprune import PruningArguments
            >>> PruningArguments(prune_units_fraction="ffn=0.25, experts=0.5").unit_fractions
            {'ffn': 0.25, 'experts': 0.5}
        """
        return parse_unit_fractions(self.prune_units_fraction)

    @property
    def prunes_structures(self) -> bool:
        """Whether any structural unit (layer, head, FFN neuron) is to be removed."""
        return (
            self.prunes_layers
            or self.prunes_heads
            or self.prunes_ffn
            or bool(self.unit_targets)
            or self._budget_cuts(LAYERS)
        )

    @property
    def layer_by_layer_flags(self) -> list[str]:
        """The flags set that prune weights layer by layer (block by block) instead of in one shot."""
        return [
            flag
            for flag, on in (
                ("--sequential_calibration", self.sequential_calibration),
                ("--weight_importance sparsegpt", self.weight_importance == "sparsegpt"),
                (
                    f"--weight_reconstruction {self.weight_reconstruction}",
                    self.weight_reconstruction != "none",
                ),
                ("--weight_sparsity_allocation owl", self.weight_sparsity_allocation == "owl"),
            )
            if on
        ]

    @property
    def distills(self) -> bool:
        """Whether ``PruningTrainer`` adds a distillation term to its loss."""
        return self.distill_alpha > 0.0

    @property
    def prunes_weights(self) -> bool:
        """Whether any weight is to be masked."""
        return self.weight_sparsity > 0.0

    @property
    def weights_read_data(self) -> bool:
        """Whether weight pruning reads calibration batches: a criterion that declares it needs them,
        SparseGPT, reconstruction or OWL's allocation."""
        return (
            needs_calibration(self.weight_importance)
            or self.weight_reconstruction != "none"
            or self.weight_sparsity_allocation != "uniform"
        )
