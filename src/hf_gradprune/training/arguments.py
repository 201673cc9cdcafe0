"""``PruningArguments``: the pruning flags, one dataclass that ``HfArgumentParser`` turns into a CLI."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

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
from ..weights.criteria import WEIGHT_CRITERIA
from .argument_checks import ArgumentChecks
from .flag_values import FlagMeanings, implied_sparsity, parse_steps


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
class PruningArguments(ArgumentChecks, FlagMeanings):
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
