"""What a pruning run is refused or warned about before it trains: sharded training it cannot follow,
structures under LoRA, a model that arrives pruned, and schedule steps past the end of training."""

from __future__ import annotations

import warnings

from torch import nn
from transformers import TrainingArguments

from ..core.masks import get_masks
from ..core.record import PruningRecord
from ..structured.flops import flops_ratio
from .arguments import PruningArguments
from .lora import is_peft_model
from .planning import PruningPlan


def fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version ``args`` ask for (``fsdp_config["fsdp_version"]``, default 1); ``None``: no FSDP."""
    config = args.fsdp_config or {}  # TrainingArguments strips the "fsdp_" of its keys
    return int(config.get("version", config.get("fsdp_version", 1))) if args.fsdp else None


def refuse_sharded_training(
    pruning_args: PruningArguments, fsdp_version: int | None, deepspeed: bool
) -> None:
    """What does not run sharded is refused with the reason: DeepSpeed, FSDP 1, and under FSDP2 what
    reads whole parameters or copies the model (``fsdp_version``: ``None`` without FSDP)."""
    if deepspeed:
        raise ValueError(
            "hf_gradprune does not support DeepSpeed training: its weight masks and gradient hooks, "
            "importance and head/neuron surgery work on whole parameters or on FSDP2's shards, which "
            "DeepSpeed partitions otherwise (the masks would not match the partitions). Train with FSDP2 "
            "(`--fsdp full_shard --fsdp_config '{\"fsdp_version\": 2}'`) or DDP. See docs/scaling.md."
        )
    if fsdp_version is None:
        return
    if fsdp_version != 2:
        raise ValueError(
            f"hf_gradprune supports FSDP2 only, got fsdp_version={fsdp_version}: FSDP 1 flattens the "
            "parameters that masks and importance address by name. Set `fsdp_config={'fsdp_version': 2}` "
            "(`--fsdp_config '{\"fsdp_version\": 2}'`). See docs/scaling.md."
        )
    args = pruning_args
    later = args.prunes_structures and any(step > 0 for step in args.prune_step_list)
    structures = f"heads, FFN neurons or layers after step 0 (`--prune_steps {args.prune_steps}`)"
    unsupported = [
        *(["--distill_alpha"] if args.distills else []),
        *args.layer_by_layer_flags,
        *([f"--scoring_passes {args.scoring_passes}"] if args.scoring_passes > 1 else []),
        *(["--export_vanilla"] if args.export_vanilla else []),
        *([structures] if later else []),
    ]
    if unsupported:
        raise ValueError(
            "Under FSDP2 hf_gradprune prunes weights in one shot (every `--weight_importance` but "
            "sparsegpt, every scope and N:M pattern) and cuts heads, FFN neurons and layers at step 0 "
            f"with PruningTrainer (before the model is sharded), not yet {', '.join(unsupported)}: they "
            "read whole parameters, change shapes after sharding or copy the model on every rank. Train "
            "with DDP, or prune in one process first and fine-tune the pruned model with its masks under "
            "FSDP2. See docs/scaling.md."
        )


def refuse_structures_under_lora(pruning_args: PruningArguments, model: nn.Module | None) -> None:
    """Heads, FFN neurons and layers are not cut in a peft model: a ``ValueError`` saying what to do."""
    if pruning_args.prunes_structures and is_peft_model(model):
        raise ValueError(
            "Heads, FFN neurons and layers are not cut under LoRA (`peft_config`): the adapters' "
            "matrices would have to be cut with their layers. Cut first (without `peft_config`, then "
            "save the smaller model), then train LoRA on it. Weight pruning (`--weight_sparsity`) works "
            "under LoRA: the base weights are masked and so is the LoRA update, so `merge_and_unload` "
            "keeps the zeros."
        )


def already_pruned_warning(model: nn.Module, pruning_args: PruningArguments) -> str | None:
    """What a fresh run should be told when ``model`` arrives pruned: how the arguments apply to it."""
    record = PruningRecord.from_config(getattr(model, "config", None))
    masked = len(get_masks(model))
    if record.is_empty() and not masked:
        return None
    args = pruning_args
    found = [f"{name}: {sum(map(len, layers.values()))} removed" for name, layers in record.pruned.items()]
    found += [f"{masked} masked weight tensors"] if masked else []
    message = (
        f"The model is already pruned ({', '.join(found)}). Head and FFN counts and fractions remove "
        "that many more; `--target_flops_ratio` counts from the original model; weight masks are "
        "recomputed at `--weight_sparsity` over all weights, the zeros included."
    )
    if args.prunes_by_flops and getattr(model, "config", None) is not None and not record.is_empty():
        now = flops_ratio(model, args.flops_seq_len)
        if now <= args.target_flops_ratio:
            message += f" Its FLOPs are already {now:.1%} of the original: no head or neuron will go."
    return message


def warn_about_the_schedule(plan: PruningPlan, max_steps: int) -> None:
    """Prune steps and ramp ends at or past the end of training never happen: say so at train begin."""
    args = plan.args
    steps = args.prune_step_list if args.prunes_structures or args.sparsity_schedule == "one_shot" else []
    late = [step for step in steps if step >= max_steps]
    if late and (args.prunes_structures or args.prunes_weights):
        warnings.warn(
            f"`--prune_steps` {late} are at or past the end of training (max_steps={max_steps}): those "
            "cuts never happen. Set steps below max_steps.",
            stacklevel=3,
        )
    if (
        args.prunes_weights
        and args.sparsity_schedule != "one_shot"
        and args.sparsity_schedule_end >= max_steps
    ):
        start, every = args.sparsity_schedule_start, args.sparsity_schedule_frequency
        last = start + (max_steps - 1 - start) // every * every  # the ramp's last update in training
        final = (plan.weight_sparsity_at(last) if last >= start else None) or 0.0
        warnings.warn(
            f"`--sparsity_schedule_end` {args.sparsity_schedule_end} is at or past the end of training "
            f"(max_steps={max_steps}): the weights end at sparsity {final:.3g}, not the "
            f"`--weight_sparsity` {args.weight_sparsity}. End the ramp before max_steps.",
            stacklevel=3,
        )
