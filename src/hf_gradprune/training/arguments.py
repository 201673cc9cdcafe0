"""``PruningArguments``: the pruning flags, one dataclass that ``HfArgumentParser`` turns into a CLI."""

from __future__ import annotations

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
from .argument_checks import ArgumentChecks
from .flag_values import UnitTarget, implied_sparsity, parse_steps, parse_unit_counts, parse_unit_fractions


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


@dataclass
class PruningArguments(ArgumentChecks):
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
        """Normalise (sorted ``prune_steps``, the sparsity an N:M pattern implies), then check it all once."""
        self.prune_steps = ",".join(str(step) for step in parse_steps(self.prune_steps))
        implied = implied_sparsity(self.sparsity_pattern)
        # False is not unset: the type check refuses it
        unset = self.weight_sparsity == 0.0 and not isinstance(self.weight_sparsity, bool)
        if implied is not None and unset:
            self.weight_sparsity = implied
        self._validate_args()

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
        return parse_unit_counts(self.prune_units_per_layer)

    @property
    def unit_fractions(self) -> dict[str, float]:
        """``--prune_units_fraction`` as structure name to fraction (checked: identifiers, each once, in
        [0, 1)).

        Example:
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
