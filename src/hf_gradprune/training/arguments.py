"""``PruningArguments``: the pruning flags, one dataclass that ``HfArgumentParser`` turns into a CLI."""

from __future__ import annotations

import re
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..core.adapters.base import FFN, HEADS, LAYERS
from ..core.choices import (
    HEAD_ACCUMULATIONS,
    HEAD_NORMALIZATIONS,
    LAYER_IMPORTANCES,
    MASK_TUNING_METHODS,
    RECONSTRUCTIONS,
    SPARSITY_ALLOCATIONS,
    SPARSITY_SCHEDULES,
    SPARSITY_SCOPES,
    WEIGHT_SOLVERS,
)
from ..weights.criteria import WEIGHT_CRITERIA, needs_calibration


class LiveChoices(Sequence[str]):
    """``choices`` read when used, not when the module is imported: ``--weight_importance`` offers a
    criterion registered after ``import hf_gradprune`` (argparse checks and lists ``choices`` at parse)."""

    def __init__(self, read: Callable[[], tuple[str, ...]]):
        self._read = read

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._read()[index]

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return repr(self._read())


#: Every ``--weight_importance``: the registered criteria and the solvers, as they stand.
LIVE_WEIGHT_METHODS = LiveChoices(lambda: (*WEIGHT_CRITERIA, *WEIGHT_SOLVERS))
#: What ``X | None`` and ``Optional[X]`` annotations resolve to.
UNIONS = (types.UnionType, typing.Union)
PATTERN_FORM = re.compile(r"^(unstructured|(\d+):(\d+))$")


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


@dataclass
class PruningArguments:
    """What to prune, by which importance, and when.

    Example:
        >>> from transformers import HfArgumentParser
        >>> (args,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        ...     ["--prune_heads_per_layer", "1", "--weight_sparsity", "0.5", "--prune_steps", "0,500"])
        >>> args.prune_heads_per_layer, args.weight_sparsity, args.prune_step_list
        (1, 0.5, [0, 500])
    """

    # --- heads ---
    prune_heads_per_layer: int | None = field(
        default=None,
        metadata={"help": "Heads to remove from every layer (key/value groups for grouped-query models)."},
    )
    prune_heads_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction in [0, 1) of all heads to remove, ranked across layers."},
    )
    prune_min_heads_per_layer: int = field(
        default=1, metadata={"help": "Heads (key/value groups) every layer keeps."}
    )
    head_importance_normalize: str = field(
        default="layer_sum",
        metadata={
            "help": "Per-layer normalisation of head importance before heads are ranked across layers "
            "(--prune_heads_fraction); a FLOPs budget ranks raw scores.",
            "choices": HEAD_NORMALIZATIONS,
        },
    )
    head_importance_accumulate: str = field(
        default="fisher",
        metadata={
            "help": "How per-batch gate gradients g of heads and FFN neurons become a score: fisher (sum of "
            "g^2), sum_of_abs (sum of |g|) or abs_of_sum (|sum of g|, the classic head-mask recipe).",
            "choices": HEAD_ACCUMULATIONS,
        },
    )
    # --- whole layers ---
    prune_layers: int | None = field(
        default=None,
        metadata={
            "help": "Whole layers (transformer blocks) to remove, the least important first "
            "(--layer_importance), spread over --prune_steps; a model with only layers removed is an "
            "ordinary config of its family."
        },
    )
    layer_importance: str = field(
        default="fisher",
        metadata={
            "help": "How --prune_layers ranks layers: fisher (sum of squared gradients of a gate on each "
            "block's residual branch, as for heads) or block_influence (ShortGPT: 1 - cos(block input, "
            "block output), no labels).",
            "choices": LAYER_IMPORTANCES,
        },
    )
    # --- FFN neurons and FLOPs ---
    prune_ffn_fraction: float | None = field(
        default=None, metadata={"help": "Fraction in [0, 1) of the FFN neurons to remove from every layer."}
    )
    prune_units_per_layer: str | None = field(
        default=None,
        metadata={
            "help": "Units of any structure of the model's family to remove from every layer, as name=count "
            "pairs, comma-separated (e.g. 'ffn=64' or a structure a family declares in its adapter; "
            "key/value groups for grouped heads)."
        },
    )
    prune_units_fraction: str | None = field(
        default=None,
        metadata={
            "help": "Fractions in [0, 1) of the units of any structure of the model's family to remove from "
            "every layer, as name=fraction pairs, comma-separated (e.g. 'ffn=0.25' or a structure a family "
            "declares in its adapter); heads and FFN neurons also have their own flags."
        },
    )
    target_flops_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Remove heads and FFN neurons, ranked together by importance per FLOP, until the blocks' "
            "FLOPs fall to this fraction in (0, 1) of the original (instead of the head and FFN flags)."
        },
    )
    prune_flops_structures: str = field(
        default="heads,ffn",
        metadata={
            "help": "What --target_flops_ratio ranks together by importance per FLOP, comma-separated: "
            "heads, ffn, layers (whole blocks, each costing its FLOPs as it stands, ranked by the Fisher "
            "information of a gate on its residual branch)."
        },
    )
    flops_seq_len: int = field(
        default=128, metadata={"help": "Sequence length at which FLOPs are counted for --target_flops_ratio."}
    )
    prune_ffn_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Under --target_flops_ratio, FFN neurons leave each layer in blocks of this many, so "
            "every layer keeps a multiple of it (default: 64 when the FFN width is a multiple of 64, else "
            "1; 1 removes neurons one by one)."
        },
    )
    uniform_per_layer: bool = field(
        default=False,
        metadata={
            "help": "Remove as many heads (key/value groups) and as many FFN neurons from every layer under "
            "--target_flops_ratio and --prune_heads_fraction, so the result is an ordinary config of its "
            "family (see --export_vanilla)."
        },
    )
    export_vanilla: bool = field(
        default=False,
        metadata={
            "help": "PruningTrainer.save_model writes a model that plain `from_pretrained` loads: an "
            "ordinary config, weight masks folded in as zeros, no pruning record (needs the same cut in "
            "every layer)."
        },
    )
    allow_empty_layers: bool = field(
        default=False,
        metadata={"help": "Let a layer lose all its heads or all its FFN neurons (the block still runs)."},
    )
    prune_rounds: int = field(
        default=8,
        metadata={
            "help": "Rounds in which a structural cut is made, each scored anew on the model the rounds "
            "before left (one importance pass per round; a per-layer count takes at most that many rounds)."
        },
    )
    measure_speedup: bool = field(
        default=False,
        metadata={
            "help": "At each structural cut, time the forward before and after on one calibration batch and "
            "report the speed-up (logged as prune/speedup and written on the model card); holds a copy of "
            "the model for a moment."
        },
    )
    mask_tuning: bool = field(
        default=False,
        metadata={
            "help": "After each structural cut, rescale the kept heads and neurons on --importance_batches "
            "batches so the pruned model reproduces the unpruned one (--mask_tuning_method); the scales are "
            "folded into the weights."
        },
    )
    mask_tuning_method: str = field(
        default="distillation",
        metadata={
            "help": "How --mask_tuning fits the scales: distillation (all scales together, by the KL "
            "divergence from the unpruned model's outputs, stopped on held-out batches) or least_squares "
            "(block by block, Kwon et al., 2022).",
            "choices": MASK_TUNING_METHODS,
        },
    )
    # --- weights ---
    weight_sparsity: float = field(
        default=0.0, metadata={"help": "Target fraction in [0, 1) of zero weights in the targeted matrices."}
    )
    weight_importance: str = field(
        default="taylor",
        metadata={
            "help": "|w| (magnitude), |sum g| (gradient), |w * sum g| (taylor), sum g^2 (fisher), "
            "w^2 * sum g^2 (obd), combined (normalised |w| + |sum g|), wanda (|w| * ||x||) or gblm "
            "(|w| * (alpha * ||g|| + ||x||)); or sparsegpt (SparseGPT: layer Hessians choose the weights "
            "and update the kept ones, block by block).",
            "choices": LIVE_WEIGHT_METHODS,
        },
    )
    sequential_calibration: bool = field(
        default=False,
        metadata={
            "help": "Mask weights layer by layer, each layer scored on inputs that come through the layers "
            "already pruned (as Wanda and SparseGPT run): a registered family block by block, gradient "
            "criteria on the block-local loss ||block(x)||; any other model module by module, on its loss."
        },
    )
    scoring_passes: int = field(
        default=1,
        metadata={
            "help": "Score the weights one shot in this many groups of consecutive layers, each its own pass "
            "over the calibration batches holding only its accumulators, block activations recomputed in "
            "backward: the same masks in bounded memory, for about this many times the compute. Not with "
            "layer-by-layer pruning or a global scope."
        },
    )
    weight_reconstruction: str = field(
        default="none",
        metadata={
            "help": "After a block's masks are chosen, update its kept weights (block by block, a registered "
            "family): least_squares (each layer's outputs restored on its inputs), adam (Adam steps on the "
            "block's output error against the dense model) or least_squares_adam.",
            "choices": RECONSTRUCTIONS,
        },
    )
    weight_sparsity_allocation: str = field(
        default="uniform",
        metadata={
            "help": "uniform (every block at --weight_sparsity) or owl (OWL: blocks whose Wanda scores hold "
            "more outliers keep more, the same total; block by block, a registered family, unstructured).",
            "choices": SPARSITY_ALLOCATIONS,
        },
    )
    gblm_alpha: float = field(
        default=100.0, metadata={"help": "Weight of the gradient norm in --weight_importance gblm."}
    )
    sparsity_scope: str = field(
        default="per_tensor",
        metadata={"help": "Where the threshold is set.", "choices": SPARSITY_SCOPES},
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={"help": "`unstructured` or N:M, e.g. `2:4` (keep N of every M inputs)."},
    )
    prune_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions of module names to prune weights in (default: the linear "
            "layers of attention and FFN; never embeddings, norms or the classifier)."
        },
    )
    # --- when ---
    prune_steps: str = field(
        default="0",
        metadata={
            "help": "Comma-separated optimizer steps at which to prune (0 = before the first step). "
            "Heads are spread over these steps; one_shot weight sparsity is reached at the first."
        },
    )
    sparsity_schedule: str = field(
        default="one_shot",
        metadata={
            "help": "one_shot at --prune_steps, or a linear/cubic ramp of the weight sparsity.",
            "choices": SPARSITY_SCHEDULES,
        },
    )
    sparsity_schedule_start: int = field(default=0, metadata={"help": "First step of a linear/cubic ramp."})
    sparsity_schedule_end: int | None = field(
        default=None, metadata={"help": "Step at which a linear/cubic ramp reaches --weight_sparsity."}
    )
    sparsity_schedule_frequency: int = field(
        default=100, metadata={"help": "Steps between two updates of a linear/cubic ramp."}
    )
    importance_batches: int = field(default=8, metadata={"help": "Training batches per importance pass."})
    # --- recovery: distillation (PruningTrainer) ---
    distill_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight in [0, 1] of distillation in PruningTrainer's loss: (1 - alpha) * task + alpha * "
            "(T^2 * KL(teacher || student) + hidden); 0 turns it off."
        },
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the distillation KL (> 0)."}
    )
    distill_hidden_states: bool = field(
        default=False,
        metadata={
            "help": "Add the mean squared error of every kept layer's output against the teacher's layer it "
            "was (widths are kept by head and neuron pruning; removed layers are skipped)."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher, a folder or Hub id that load_pruned reads (default: a frozen copy of the "
            "model as it was before the first cut, saved once in <output_dir>/distillation_teacher so that "
            "a resumed run distils from the same)."
        },
    )

    def __post_init__(self) -> None:
        self.prune_steps = ",".join(str(s) for s in self._parse_steps(self.prune_steps))
        self._validate_args()

    @staticmethod
    def _parse_steps(value: str | int | list[int]) -> list[int]:
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

    def _validate_args(self) -> None:
        self._check_types()
        choices = {
            "head_importance_normalize": HEAD_NORMALIZATIONS,
            "head_importance_accumulate": HEAD_ACCUMULATIONS,
            "layer_importance": LAYER_IMPORTANCES,
            "mask_tuning_method": MASK_TUNING_METHODS,
            "weight_importance": tuple(LIVE_WEIGHT_METHODS),
            "weight_reconstruction": RECONSTRUCTIONS,
            "weight_sparsity_allocation": SPARSITY_ALLOCATIONS,
            "sparsity_scope": SPARSITY_SCOPES,
            "sparsity_schedule": SPARSITY_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"`--{name}` must be one of {', '.join(allowed)}, got {getattr(self, name)!r}."
                )
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
        self._validate_flops_structures()
        if self.prune_ffn_multiple_of is not None:
            if self.prune_ffn_multiple_of < 1:
                raise ValueError(f"`--prune_ffn_multiple_of` must be >= 1, got {self.prune_ffn_multiple_of}.")
            if self.target_flops_ratio is None:
                raise ValueError(
                    "`--prune_ffn_multiple_of` shapes a FLOPs budget: set `--target_flops_ratio`."
                )
        global_choice = [
            flag for flag in ("target_flops_ratio", "prune_heads_fraction") if getattr(self, flag) is not None
        ]
        if self.export_vanilla and global_choice and not self.uniform_per_layer:
            raise ValueError(
                f"`--export_vanilla` needs the same cut in every layer, and `--{global_choice[0]}` chooses "
                "per layer: add `--uniform_per_layer`."
            )
        if self.uniform_per_layer and not global_choice:
            warnings.warn(
                "`--uniform_per_layer` shapes `--target_flops_ratio` and `--prune_heads_fraction`, and "
                "neither is set: it is ignored (`--prune_heads_per_layer` and `--prune_ffn_fraction` are "
                "uniform).",
                stacklevel=3,
            )
        if self.prune_rounds < 1:
            raise ValueError(f"`--prune_rounds` must be >= 1, got {self.prune_rounds}.")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(
                f"`--distill_alpha` must be in [0, 1] (0: no distillation), got {self.distill_alpha}."
            )
        if not self.distill_temperature > 0.0:
            raise ValueError(f"`--distill_temperature` must be > 0, got {self.distill_temperature}.")
        if self.flops_seq_len < 1:
            raise ValueError(f"`--flops_seq_len` must be >= 1, got {self.flops_seq_len}.")
        if self.mask_tuning and not self.unit_structures:
            raise ValueError(
                "`--mask_tuning` rescales kept heads and neurons after a structural cut: set "
                "`--prune_heads_per_layer`, `--prune_heads_fraction`, `--prune_ffn_fraction`, "
                "`--prune_units_*` or `--target_flops_ratio`."
            )
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
        self._validate_pattern()
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
        self._warn_flags_of_features_off()
        if not self.prunes_structures and not self.prunes_weights:
            warnings.warn(
                "PruningArguments prune nothing: set `--prune_layers`, `--prune_heads_per_layer`, "
                "`--prune_heads_fraction`, `--prune_ffn_fraction`, `--prune_units_*`, "
                "`--target_flops_ratio` or `--weight_sparsity`.",
                stacklevel=3,
            )

    def _validate_flops_structures(self) -> None:
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

    def _warn_flags_of_features_off(self) -> None:
        """One policy for a flag whose feature is off: a warning naming the flag and what turns it on."""
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
                    stacklevel=4,
                )

    def _validate_pattern(self) -> None:
        match = PATTERN_FORM.match(self.sparsity_pattern)
        n_m = match and match.group(2) and (int(match.group(2)), int(match.group(3)))
        if not match or (n_m and not 0 < n_m[0] < n_m[1]):
            raise ValueError(
                f"`--sparsity_pattern` must be `unstructured` or N:M with 0 < N < M (e.g. 2:4), "
                f"got {self.sparsity_pattern!r}."
            )
        if n_m:
            implied = 1 - n_m[0] / n_m[1]
            if self.weight_sparsity == 0.0:
                self.weight_sparsity = implied
            elif abs(self.weight_sparsity - implied) > 1e-9:
                raise ValueError(
                    f"`--sparsity_pattern {self.sparsity_pattern}` implies `--weight_sparsity` {implied:g}, "
                    f"got {self.weight_sparsity}; leave `--weight_sparsity` unset or set it to {implied:g}."
                )
            if self.sparsity_schedule != "one_shot":
                raise ValueError(
                    f"`--sparsity_pattern {self.sparsity_pattern}` is applied at once: use "
                    f"`--sparsity_schedule one_shot`, got {self.sparsity_schedule!r}."
                )

    @property
    def prune_step_list(self) -> list[int]:
        """``prune_steps`` as sorted integers."""
        return self._parse_steps(self.prune_steps)

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
            >>> PruningArguments(prune_units_per_layer="ffn=64").unit_counts
            {'ffn': 64}
        """
        return {
            name: int(value)
            for name, value in _pairs(
                "prune_units_per_layer",
                self.prune_units_per_layer,
                lambda v: v.isdigit(),
                "each count >= 0",
                "'ffn=64'",
            ).items()
        }

    @property
    def unit_fractions(self) -> dict[str, float]:
        """``--prune_units_fraction`` as structure name to fraction (checked: identifiers, each once, in
        [0, 1)).

        Example:
            >>> PruningArguments(prune_units_fraction="ffn=0.25, experts=0.5").unit_fractions
            {'ffn': 0.25, 'experts': 0.5}
        """
        return {
            name: float(value)
            for name, value in _pairs(
                "prune_units_fraction",
                self.prune_units_fraction,
                _is_fraction,
                "each fraction in [0, 1)",
                "'ffn=0.25'",
            ).items()
        }

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

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a JSON-ready dict (for model cards and logs)."""
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, as :meth:`to_dict` gives values (the card lists only what differs).

        Example:
            >>> PruningArguments.defaults()["weight_sparsity"]
            0.0
        """
        return {
            f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(cls)
            if f.init
        }


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
