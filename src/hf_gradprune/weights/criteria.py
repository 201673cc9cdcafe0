"""Weight criteria: each is one registration saying what it takes from the calibration pass and how that
becomes one score per weight entry (higher is more important).

The calibration pass gathers, per target weight, only what the chosen criteria need: ``"sum"`` (the float32
sum over batches of ``g = dL/dW``), ``"square"`` (``Σ g²`` over single examples, the empirical Fisher) and
``"inputs"`` (per input channel, the sum of the squared inputs over every token). A new criterion is one
:func:`register_weight_criterion` call; ``--weight_importance``, :func:`hf_gradprune.prune_weights` and the
layer-by-layer pass then offer it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapters.layout import per_input_channel

#: What a calibration pass can gather for a criterion.
CALIBRATION_SUMS = ("sum", "square", "inputs")

Score = Callable[[nn.Module, Mapping[str, torch.Tensor], float], torch.Tensor]


@dataclass(frozen=True)
class WeightCriterion:
    """One weight importance.

    Args:
        name (`str`): what ``--weight_importance`` and ``method=`` call it.
        needs (`frozenset[str]`): what it takes from the calibration pass, of :data:`CALIBRATION_SUMS`
            (empty: no data needed).
        score (`Callable`): ``score(module, sums, alpha)``, the new float32 scores of ``module.weight`` from
            ``sums`` (each need to its all-reduced tensor, shared by the criteria scored together: do not
            change them in place) and ``alpha`` (``--gblm_alpha``, for the criteria that mix two terms).
    """

    name: str
    needs: frozenset[str]
    score: Score


#: Criterion name to its registration, in registration order.
WEIGHT_CRITERIA: dict[str, WeightCriterion] = {}


def register_weight_criterion(name: str, needs: set[str] | frozenset[str], score: Score) -> WeightCriterion:
    """Register a weight criterion under ``name``; a name already taken or an unknown need is refused.

    Example:
        >>> square = lambda module, sums, alpha: module.weight.detach().float() ** 2
        >>> criterion = register_weight_criterion("doc_square", set(), square)
        >>> "doc_square" in WEIGHT_CRITERIA, sorted(criterion.needs)
        (True, [])
        >>> del WEIGHT_CRITERIA["doc_square"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty str, got {name!r}.")
    if name in WEIGHT_CRITERIA:
        raise ValueError(f"A weight criterion named {name!r} is already registered.")
    unknown = set(needs) - set(CALIBRATION_SUMS)
    if unknown:
        raise ValueError(
            f"`needs` must be drawn from {', '.join(map(repr, CALIBRATION_SUMS))}, got {sorted(unknown)}."
        )
    criterion = WeightCriterion(name, frozenset(needs), score)
    WEIGHT_CRITERIA[name] = criterion
    return criterion


def needs_calibration(method: str) -> bool:
    """Whether ``method`` reads calibration data: a registered criterion by what it declares it needs, any
    other method (a solver such as SparseGPT) always.

    Example:
        >>> needs_calibration("magnitude"), needs_calibration("wanda"), needs_calibration("sparsegpt")
        (False, True, True)
    """
    criterion = WEIGHT_CRITERIA.get(method)
    return criterion is None or bool(criterion.needs)


def _magnitude(module: nn.Module) -> torch.Tensor:
    """A new float32 tensor ``|weight|``."""
    return module.weight.detach().abs().float()


def _mean_normalized(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` divided in place by their mean (all-zero scores stay zero)."""
    return scores.div_(scores.mean().clamp_min(torch.finfo(torch.float32).tiny))


def _input_norms(module: nn.Module, sums: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sqrt(Σ x²)`` per input channel, viewed against ``module.weight``."""
    return per_input_channel(module, sums["inputs"].sqrt())


register_weight_criterion("magnitude", set(), lambda module, sums, alpha: _magnitude(module))
register_weight_criterion("gradient", {"sum"}, lambda module, sums, alpha: sums["sum"].abs())
register_weight_criterion(
    "taylor", {"sum"}, lambda module, sums, alpha: sums["sum"].mul(module.weight.detach()).abs_()
)
register_weight_criterion("fisher", {"square"}, lambda module, sums, alpha: sums["square"].clone())
register_weight_criterion(
    "obd", {"square"}, lambda module, sums, alpha: _magnitude(module).square_().mul_(sums["square"])
)
register_weight_criterion(
    "combined",
    {"sum"},
    lambda module, sums, alpha: _mean_normalized(sums["sum"].abs()).add_(
        _mean_normalized(_magnitude(module))
    ),
)
register_weight_criterion(
    "wanda", {"inputs"}, lambda module, sums, alpha: _magnitude(module).mul_(_input_norms(module, sums))
)
register_weight_criterion(
    "gblm",
    {"square", "inputs"},
    lambda module, sums, alpha: (
        sums["square"].sqrt().mul_(alpha).add_(_input_norms(module, sums)).mul_(_magnitude(module))
    ),
)
