"""The allowed values of the choices that pruning functions and flags share, and the check that names them."""

from __future__ import annotations

HEAD_NORMALIZATIONS = ("layer_sum", "l2", "none")

HEAD_ACCUMULATIONS = ("fisher", "sum_of_abs", "abs_of_sum")

LAYER_IMPORTANCES = ("fisher", "block_influence")

MASK_TUNING_METHODS = ("distillation", "least_squares")

#: What chooses the pruned weights besides a criterion: SparseGPT (which also updates the kept ones).
WEIGHT_SOLVERS = ("sparsegpt",)

#: How the kept weights of a block are updated once its masks are chosen (layer by layer only).
RECONSTRUCTIONS = ("none", "least_squares", "adam", "least_squares_adam")

SPARSITY_ALLOCATIONS = ("uniform", "owl")

SPARSITY_SCOPES = ("per_tensor", "per_row", "per_layer", "global")

SPARSITY_SCHEDULES = ("one_shot", "linear", "cubic")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming ``name`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
