"""Worker of tests/test_distributed.py, one process per rank under ``torchrun``: a pruning Trainer on gloo.

Usage: ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR MODE`` with MODE one of
``one_shot`` (weight sparsity 0.5 at step 0), ``linear`` (0 -> 0.5 over steps 0..6, every 2 steps),
``heads0`` (PruningTrainer: one head per layer cut before training, then weight sparsity 0.5), ``flops0``
(PruningTrainer: heads and FFN neurons to half the FLOPs with mask tuning, before training), ``distill``
(PruningTrainer: the same cut, then training with distillation from the model before the cut, hidden
states included) or ``heads``
(a head cut at step 3, mid-training, which the callback refuses in multi-process training) or ``fsdp``
(weight pruning with two scoring passes under FSDP2 ``full_shard``, which the callback refuses when the
Trainer is built: FSDP2 runs one-shot weight pruning only, tested in ``fsdp_trainer_worker.py``).

Each rank writes into OUT_DIR:

- ``batches_rank{R}.safetensors``: the ``input_ids`` of the importance batches the callback draws at step 0;
- ``masks_rank{R}_step{S}.safetensors``: the masks right after each step ``S`` at which they changed;
- ``masks_rank{R}.safetensors`` and ``weights_rank{R}.safetensors``: masks and parameters after training;
- ``heads_rank{R}.json`` and ``record_rank{R}.json``: the pruned heads, and the whole pruning record;
- in ``heads`` and ``fsdp`` modes, ``error_rank{R}.txt`` with the message of the ``ValueError`` (then
  re-raised).

``HF_GRADPRUNE_TEST_NO_ALLREDUCE=1`` replaces ``all_reduce_sum`` of the scoring modules by the identity
before training, so each rank selects from its own shard only: the control that shows the test can fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

import hf_gradprune.structured.importance
import hf_gradprune.weights.scoring
from hf_gradprune import GradientPruningCallback, PruningArguments, PruningRecord, PruningTrainer
from hf_gradprune.core.batches import take_batches
from hf_gradprune.core.mask_files import save_masks
from hf_gradprune.core.masks import get_masks
from tests.helpers import VOCAB, build_tiny, leave_process_group

NUM_ROWS, LENGTH, IMPORTANCE_BATCHES, MAX_STEPS = 64, 16, 2, 8
PRUNING = {
    "one_shot": {"weight_sparsity": 0.5, "weight_importance": "taylor", "prune_steps": "0"},
    "linear": {
        "weight_sparsity": 0.5,
        "weight_importance": "taylor",
        "sparsity_schedule": "linear",
        "sparsity_schedule_start": 0,
        "sparsity_schedule_end": 6,
        "sparsity_schedule_frequency": 2,
    },
    "heads0": {"prune_heads_per_layer": 1, "prune_steps": "0", "weight_sparsity": 0.5},
    "heads": {"prune_heads_per_layer": 1, "prune_steps": "3"},
    "flops0": {"target_flops_ratio": 0.5, "flops_seq_len": LENGTH, "mask_tuning": True, "prune_steps": "0"},
    "fsdp": {"weight_sparsity": 0.5, "scoring_passes": 2},
}
PRUNING["distill"] = {**PRUNING["flops0"], "distill_alpha": 0.5, "distill_hidden_states": True}
STEP0_CUTS = ("heads0", "flops0", "distill")  # PruningTrainer cuts them before DDP wraps the model


def random_dataset() -> Dataset:
    """The same random token ids and binary labels on every rank (the sampler shards them)."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (NUM_ROWS, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (NUM_ROWS,), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "labels": labels.tolist(),
        }
    )


class Recorder(TrainerCallback):
    """Runs after the pruning callback: saves the importance batches at step 0 and every new mask set."""

    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank
        self.last: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            batches = take_batches(kwargs["train_dataloader"], IMPORTANCE_BATCHES)
            tensors = {f"input_ids_{i}": b["input_ids"].contiguous() for i, b in enumerate(batches)}
            save_file(tensors, self.out / f"batches_rank{self.rank}.safetensors")
        masks = get_masks(kwargs["model"])
        if masks.keys() != self.last.keys() or any(not torch.equal(masks[k], self.last[k]) for k in masks):
            save_masks(masks, self.out / f"masks_rank{self.rank}_step{state.global_step}.safetensors")
            self.last = masks


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if os.environ.get("HF_GRADPRUNE_TEST_NO_ALLREDUCE") == "1":
        for scoring in (hf_gradprune.structured.importance, hf_gradprune.weights.scoring):
            scoring.all_reduce_sum = lambda tensor: tensor
    sharding = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if mode == "fsdp" else {}
    args = TrainingArguments(
        **sharding,
        output_dir=str(out / "trainer"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    rank = args.process_index
    model = build_tiny("bert").train()
    pruning_args = PruningArguments(importance_batches=IMPORTANCE_BATCHES, **PRUNING[mode])
    common = {"model": model, "args": args, "train_dataset": random_dataset()}
    if mode == "fsdp":
        try:
            Trainer(**common, callbacks=[GradientPruningCallback(pruning_args)])
        except ValueError as error:
            (out / f"error_rank{rank}.txt").write_text(str(error))
            raise
    if mode in STEP0_CUTS:
        trainer = PruningTrainer(**common, pruning_args=pruning_args, callbacks=[Recorder(out, rank)])
        trainer.pruning_callback.show_progress = False
    else:
        pruning = GradientPruningCallback(pruning_args, show_progress=False)
        trainer = Trainer(**common, callbacks=[pruning, Recorder(out, rank)])
    try:
        trainer.train()
    except ValueError as error:
        if mode != "heads":
            raise
        (out / f"error_rank{rank}.txt").write_text(str(error))
        dist.barrier()  # both ranks have written their file before either exits
        raise
    save_masks(get_masks(model), out / f"masks_rank{rank}.safetensors")
    record = PruningRecord.from_config(model.config)
    (out / f"heads_rank{rank}.json").write_text(json.dumps(record.pruned_heads))
    (out / f"record_rank{rank}.json").write_text(json.dumps(record.to_dict()))
    weights = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(weights, out / f"weights_rank{rank}.safetensors")
    leave_process_group()


if __name__ == "__main__":
    main()
