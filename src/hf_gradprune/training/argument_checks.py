"""Checks of ``PruningArguments``: types, values, and a warning for each flag whose feature is off."""

from __future__ import annotations

import types
import typing
import warnings
from dataclasses import fields

from ..core.adapters.base import FFN, HEADS, LAYERS
from .flag_values import implied_sparsity

#: What ``X | None`` and ``Optional[X]`` annotations resolve to.
UNIONS = (types.UnionType, typing.Union)
#: ``stacklevel`` of a warning here: this class's two frames, ``__post_init__``, the dataclass's
#: ``__init__``, then the line that built the arguments.
CALLER = 5


class ArgumentChecks:
    """The checks of :class:`PruningArguments`, which runs ``_validate_args`` once ``__post_init__`` has
    normalised its fields (as ``TrainingArguments`` does): types before values, then a warning for each flag
    whose feature is off."""

    def _validate_args(self) -> None:
        """Check the arguments (types before any value is compared), then warn of each flag that changes
        nothing.

        Raises:
            `TypeError`: a field not of its annotated type, naming the flag.
            `ValueError`: a value out of range, or flags that contradict each other, naming them and the fix.
        """
        self._check_types()
        self._check_choices()
        self._check_structures()
        self._check_distillation()
        self._check_weights()
        self._warn_ignored_flags()

    def _check_types(self) -> None:
        """Every field of the type its annotation says (``None`` only where it allows it): a ``TypeError``
        naming the flag before any value is compared."""
        hints = typing.get_type_hints(type(self))
        for item in fields(self):
            value = getattr(self, item.name)
            members = (
                typing.get_args(hints[item.name]) if typing.get_origin(hints[item.name]) in UNIONS else ()
            )
            optional = type(None) in members
            kind = next((m for m in members if m is not type(None)), hints[item.name])
            if value is None and optional:
                continue
            base = typing.get_origin(kind) or kind
            accepted = (int, float) if base is float else (base,)
            entries_ok = base is not list or (
                isinstance(value, list) and all(isinstance(entry, str) for entry in value)
            )
            if isinstance(value, bool) != (base is bool) or not isinstance(value, accepted) or not entries_ok:
                name = "list of str" if base is list else base.__name__
                allowed = f"{name} or None" if optional else name
                article = "an" if name == "int" else "a"
                raise TypeError(f"`--{item.name}` must be {article} {allowed}, got {value!r}.")

    def _check_choices(self) -> None:
        """Every field that declares ``choices`` holds one of them (read now: a criterion registered late
        counts)."""
        for item in fields(self):
            allowed = tuple(item.metadata.get("choices", ()))
            if allowed and getattr(self, item.name) not in allowed:
                raise ValueError(
                    f"`--{item.name}` must be one of {', '.join(allowed)}, got {getattr(self, item.name)!r}."
                )

    def _check_structures(self) -> None:
        """The flags of heads, layers, FFN neurons, other structures and the FLOPs budget."""
        if self.prune_heads_per_layer is not None and self.prune_heads_fraction is not None:
            raise ValueError(
                "Give at most one of `--prune_heads_per_layer` and `--prune_heads_fraction`, got "
                f"{self.prune_heads_per_layer} and {self.prune_heads_fraction}."
            )
        if self.prune_heads_per_layer is not None and self.prune_heads_per_layer < 0:
            raise ValueError(f"`--prune_heads_per_layer` must be >= 0, got {self.prune_heads_per_layer}.")
        if self.prune_heads_fraction is not None and not 0.0 <= self.prune_heads_fraction < 1.0:
            raise ValueError(f"`--prune_heads_fraction` must be in [0, 1), got {self.prune_heads_fraction}.")
        if self.prune_min_heads_per_layer < 0 or (
            self.prune_min_heads_per_layer == 0 and not self.allow_empty_layers
        ):
            raise ValueError(
                f"`--prune_min_heads_per_layer` must be >= 1 (0 with --allow_empty_layers), got "
                f"{self.prune_min_heads_per_layer}."
            )
        if self.prune_layers is not None and self.prune_layers < 0:
            raise ValueError(f"`--prune_layers` must be >= 0, got {self.prune_layers}.")
        if self.prune_ffn_fraction is not None and not 0.0 <= self.prune_ffn_fraction < 1.0:
            raise ValueError(f"`--prune_ffn_fraction` must be in [0, 1), got {self.prune_ffn_fraction}.")
        self._check_unit_flags()
        self._check_flops_budget()
        global_choice = [
            flag for flag in ("target_flops_ratio", "prune_heads_fraction") if getattr(self, flag) is not None
        ]
        if self.export_vanilla and global_choice and not self.uniform_per_layer:
            raise ValueError(
                f"`--export_vanilla` needs the same cut in every layer, and `--{global_choice[0]}` chooses "
                "per layer: add `--uniform_per_layer`."
            )
        if self.prune_rounds < 1:
            raise ValueError(f"`--prune_rounds` must be >= 1, got {self.prune_rounds}.")
        if self.flops_seq_len < 1:
            raise ValueError(f"`--flops_seq_len` must be >= 1, got {self.flops_seq_len}.")
        if self.mask_tuning and not self.unit_structures:
            raise ValueError(
                "`--mask_tuning` rescales kept heads and neurons after a structural cut: set "
                "`--prune_heads_per_layer`, `--prune_heads_fraction`, `--prune_ffn_fraction`, "
                "`--prune_units_*` or `--target_flops_ratio`."
            )

    def _check_unit_flags(self) -> None:
        """``--prune_units_*`` well formed, and no structure asked for by two flags."""
        counts = self.unit_counts
        named = {**counts, **self.unit_fractions}
        both = sorted(set(counts) & set(self.unit_fractions))
        if both:
            raise ValueError(
                f"`--prune_units_per_layer` and `--prune_units_fraction` both ask for {both[0]}: give one of "
                "them."
            )
        for flag, name in (
            ("prune_heads_per_layer", HEADS),
            ("prune_heads_fraction", HEADS),
            ("prune_ffn_fraction", FFN),
        ):
            if getattr(self, flag) is not None and name in named:
                raise ValueError(
                    f"`--{flag}` and `--prune_units_* {name}=...` both ask for {name}: give one of them."
                )

    def _check_flops_budget(self) -> None:
        """``--target_flops_ratio`` alone of the amount flags, and what it ranks, named once each."""
        if self.target_flops_ratio is not None:
            if not 0.0 < self.target_flops_ratio < 1.0:
                raise ValueError(f"`--target_flops_ratio` must be in (0, 1), got {self.target_flops_ratio}.")
            given = [
                flag
                for flag in (
                    "prune_heads_per_layer",
                    "prune_heads_fraction",
                    "prune_ffn_fraction",
                    "prune_units_per_layer",
                    "prune_units_fraction",
                )
                if getattr(self, flag) is not None
            ]
            if given:
                raise ValueError(
                    f"`--target_flops_ratio` chooses heads and FFN neurons itself: leave out "
                    f"{', '.join('`--' + flag + '`' for flag in given)}."
                )
        names = self.flops_structures
        if not names or len(set(names)) < len(names) or not all(name.isidentifier() for name in names):
            raise ValueError(
                f"`--prune_flops_structures` must name structures once each, comma-separated ({HEADS}, "
                f"{FFN}, {LAYERS} or another structure of the model's family), got "
                f"{self.prune_flops_structures!r}."
            )
        if self.prunes_by_flops and LAYERS in names:
            if self.uniform_per_layer:
                raise ValueError(
                    "`--uniform_per_layer` ranks one slice of every layer at a time, which a whole layer is "
                    "not: leave `layers` out of `--prune_flops_structures`, or `--uniform_per_layer` off."
                )
            if self.mask_tuning and self.mask_tuning_method == "least_squares":
                raise ValueError(
                    "`--mask_tuning_method least_squares` fits each layer to the same layer before the cut, "
                    "which removing whole layers renumbers: use `distillation` with `layers` in "
                    "`--prune_flops_structures`."
                )
        if self.prune_ffn_multiple_of is not None:
            if self.prune_ffn_multiple_of < 1:
                raise ValueError(f"`--prune_ffn_multiple_of` must be >= 1, got {self.prune_ffn_multiple_of}.")
            if self.target_flops_ratio is None:
                raise ValueError(
                    "`--prune_ffn_multiple_of` shapes a FLOPs budget: set `--target_flops_ratio`."
                )

    def _check_distillation(self) -> None:
        """The distillation weight and temperature."""
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(
                f"`--distill_alpha` must be in [0, 1] (0: no distillation), got {self.distill_alpha}."
            )
        if not self.distill_temperature > 0.0:
            raise ValueError(f"`--distill_temperature` must be > 0, got {self.distill_temperature}.")

    def _check_weights(self) -> None:
        """The flags of weight pruning: how it scores, its sparsity and pattern, and when it is reached."""
        layer_by_layer = self.layer_by_layer_flags
        if self.scoring_passes < 1:
            raise ValueError(f"`--scoring_passes` must be >= 1, got {self.scoring_passes}.")
        if self.scoring_passes > 1 and (layer_by_layer or self.sparsity_scope == "global"):
            reason = f"`{layer_by_layer[0]}`" if layer_by_layer else "`--sparsity_scope global`"
            raise ValueError(
                f"`--scoring_passes {self.scoring_passes}` splits one-shot scoring over groups of layers; "
                f"{reason} cannot be split that way (block by block already holds one block's statistics "
                "at a time): leave `--scoring_passes` at 1."
            )
        if layer_by_layer and self.sparsity_scope == "global":
            raise ValueError(
                f"`{layer_by_layer[0]}` scores each layer on a different model: use `--sparsity_scope` "
                "per_row, per_tensor or per_layer, not global."
            )
        if self.weight_importance == "sparsegpt" and self.sparsity_scope == "per_layer":
            raise ValueError(
                "`--weight_importance sparsegpt` chooses per row or per block of columns: use "
                "`--sparsity_scope` per_row or per_tensor."
            )
        if self.gblm_alpha < 0:
            raise ValueError(f"`--gblm_alpha` must be >= 0, got {self.gblm_alpha}.")
        if not 0.0 <= self.weight_sparsity < 1.0:
            raise ValueError(f"`--weight_sparsity` must be in [0, 1), got {self.weight_sparsity}.")
        self._check_pattern()
        if self.importance_batches < 1:
            raise ValueError(f"`--importance_batches` must be >= 1, got {self.importance_batches}.")
        if self.sparsity_schedule != "one_shot":
            end = self.sparsity_schedule_end
            if end is None or end <= self.sparsity_schedule_start or self.sparsity_schedule_start < 0:
                raise ValueError(
                    f"`--sparsity_schedule {self.sparsity_schedule}` needs 0 <= `--sparsity_schedule_start` "
                    f"< `--sparsity_schedule_end`, got start={self.sparsity_schedule_start} and end={end}."
                )
            if self.sparsity_schedule_frequency < 1:
                raise ValueError(
                    f"`--sparsity_schedule_frequency` must be >= 1, got {self.sparsity_schedule_frequency}."
                )
        if self.weight_sparsity_allocation == "owl" and self.sparsity_pattern != "unstructured":
            raise ValueError(
                f"`--weight_sparsity_allocation owl` spreads an unstructured sparsity over the blocks; "
                f"`--sparsity_pattern {self.sparsity_pattern}` fixes it in every block: use one or the other."
            )

    def _check_pattern(self) -> None:
        """``--sparsity_pattern`` unstructured, or N:M with the sparsity it implies, reached at once."""
        implied = implied_sparsity(self.sparsity_pattern)
        if implied is None:
            if self.sparsity_pattern != "unstructured":
                raise ValueError(
                    f"`--sparsity_pattern` must be `unstructured` or N:M with 0 < N < M (e.g. 2:4), "
                    f"got {self.sparsity_pattern!r}."
                )
            return
        if abs(self.weight_sparsity - implied) > 1e-9:
            raise ValueError(
                f"`--sparsity_pattern {self.sparsity_pattern}` implies `--weight_sparsity` {implied:g}, "
                f"got {self.weight_sparsity}; leave `--weight_sparsity` unset or set it to {implied:g}."
            )
        if self.sparsity_schedule != "one_shot":
            raise ValueError(
                f"`--sparsity_pattern {self.sparsity_pattern}` is applied at once: use "
                f"`--sparsity_schedule one_shot`, got {self.sparsity_schedule!r}."
            )

    def _warn_ignored_flags(self) -> None:
        """One policy for a flag whose feature is off: a warning naming the flag and what turns it on."""
        global_choice = self.target_flops_ratio is not None or self.prune_heads_fraction is not None
        if self.uniform_per_layer and self.unit_structures and not global_choice:  # off units: warned below
            warnings.warn(
                "`--uniform_per_layer` shapes `--target_flops_ratio` and `--prune_heads_fraction`, and "
                "neither is set: it is ignored (`--prune_heads_per_layer` and `--prune_ffn_fraction` are "
                "uniform).",
                stacklevel=CALLER,
            )
        weights = (
            "weight pruning",
            "`--weight_sparsity` or an N:M `--sparsity_pattern`",
            self.prunes_weights,
        )
        ramp = (
            "a sparsity ramp",
            "`--sparsity_schedule linear` or `cubic`",
            self.sparsity_schedule != "one_shot",
        )
        distillation = ("distillation", "`--distill_alpha` above 0", self.distills)
        units = (
            "head and FFN neuron pruning",
            "`--prune_heads_per_layer`, `--prune_heads_fraction`, `--prune_ffn_fraction`, "
            "`--prune_units_*` or `--target_flops_ratio`",
            bool(self.unit_structures),
        )
        heads = (
            "head pruning",
            "`--prune_heads_per_layer`, `--prune_heads_fraction` or `--target_flops_ratio`",
            self.prunes_heads,
        )
        features = {
            "prune_min_heads_per_layer": heads,
            "head_importance_normalize": heads,
            "head_importance_accumulate": units,
            "uniform_per_layer": units,
            "allow_empty_layers": units,
            "prune_rounds": units,
            "mask_tuning": units,
            "weight_importance": weights,
            "sparsity_scope": weights,
            "sparsity_schedule": weights,
            "prune_steps": (
                "a structural cut or one-shot weight pruning (a ramp follows `--sparsity_schedule_*`)",
                "structures to prune, or `--weight_sparsity` with `--sparsity_schedule one_shot`",
                self.prunes_structures or (self.prunes_weights and self.sparsity_schedule == "one_shot"),
            ),
            "importance_batches": (
                "scoring on training batches",
                "structures to prune, or a `--weight_importance` that reads data",
                self.prunes_structures or (self.prunes_weights and self.weights_read_data),
            ),
            "layer_importance": ("layer pruning", "`--prune_layers`", self.prunes_layers),
            "prune_flops_structures": ("a FLOPs budget", "`--target_flops_ratio`", self.prunes_by_flops),
            "mask_tuning_method": ("mask tuning", "`--mask_tuning`", self.mask_tuning),
            "measure_speedup": (
                "structural cuts",
                "`--prune_layers`, `--prune_heads_*`, `--prune_*_fraction` or `--target_flops_ratio`",
                self.prunes_structures,
            ),
            "weight_reconstruction": weights,
            "weight_sparsity_allocation": weights,
            "sequential_calibration": weights,
            "scoring_passes": weights,
            "prune_target_modules": weights,
            "gblm_alpha": (
                "the gblm criterion",
                "`--weight_importance gblm`",
                self.weight_importance == "gblm",
            ),
            "distill_temperature": distillation,
            "distill_hidden_states": distillation,
            "teacher_model_name_or_path": distillation,
            "sparsity_schedule_start": ramp,
            "sparsity_schedule_end": ramp,
            "sparsity_schedule_frequency": ramp,
        }
        defaults = self.defaults()
        for flag, (feature, switch, on) in features.items():
            value = getattr(self, flag)
            if not on and value != defaults[flag]:
                warnings.warn(
                    f"`--{flag} {value}` shapes {feature}, which is off: it is ignored (set {switch}).",
                    stacklevel=CALLER,
                )
        if not self.prunes_structures and not self.prunes_weights:
            warnings.warn(
                "PruningArguments prune nothing: set `--prune_layers`, `--prune_heads_per_layer`, "
                "`--prune_heads_fraction`, `--prune_ffn_fraction`, `--prune_units_*`, "
                "`--target_flops_ratio` or `--weight_sparsity`.",
                stacklevel=CALLER,
            )
