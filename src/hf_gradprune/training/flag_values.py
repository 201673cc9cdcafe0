"""What the text of a flag means: ``--prune_steps``, an N:M ``--sparsity_pattern``, the ``name=value``
pairs of ``--prune_units_*``, and the ``UnitTarget`` a count or fraction flag asks of a structure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
