"""Worker of ``tests/test_fsdp_trainer.py``: weight pruning through the ``Trainer``'s own FSDP2 path
(``fsdp=True``, ``fsdp_config={"fsdp_version": 2}``), under ``torchrun --nproc_per_node 2`` (gloo, CPU), or
the same run in one process.

``python fsdp_trainer_worker.py OUT RUN,FAMILY,CRITERION,PATTERN[,TRAINER[,bf16]]``:

- ``RUN``: ``fsdp`` (two processes, sharded by accelerate), ``single`` (one process, the two ranks'
  batches as one), ``control`` (two processes, each rank's importance left unsummed across ranks: the
  control that shows the comparison can fail), ``kill`` (two processes, SIGKILL of both after the step-4
  checkpoint), ``resume`` (two processes, resumed from that checkpoint) or ``push`` (two processes, a
  checkpoint every 3 steps pushed to ``test-user/fsdp-pruned`` on the Hub of ``HF_ENDPOINT``, the Trainer's
  default ``hub_strategy`` ``every_save``, with token ``HUB_TOKEN``, then ``save_model`` and ``push_to_hub``);
- ``FAMILY``: a tiny model of ``tests.helpers``, without dropout so that runs compare; ``CRITERION``:
  ``--weight_importance``; ``PATTERN``: ``per_tensor`` (``--weight_sparsity 0.5``), ``2:4``
  (``--sparsity_pattern 2:4``), ``linear`` (a linear schedule to 0.5 at step 4, every 2 steps, scored and
  masked on the shards mid-training) or ``flops`` (heads and FFN neurons to half the FLOPs with mask
  tuning, cut by ``PruningTrainer`` at step 0 before the model is sharded, then ``--weight_sparsity 0.5``);
- ``TRAINER``: ``pruning`` (``PruningTrainer``, the default) or ``callback`` (a ``Trainer`` with
  ``GradientPruningCallback``), optionally followed by ``,bf16`` (``bf16=True``: under FSDP2, accelerate's
  mixed precision, bf16 parameters in forward and backward, float32 shards; in one process, autocast).

accelerate takes its FSDP path only when the processes sit on accelerators; on CPU it would train with DDP.
The worker tells accelerate that the two CPU processes are such a group (one line before the ``Trainer`` is
built); everything after is the ``Trainer``'s and accelerate's own FSDP2 code, on CPU.

Each rank writes ``masks_rank{R}.safetensors`` (its whole masks after training) and ``result_rank{R}.json``
(``zero``: every masked entry of its local shards was exactly zero after every optimizer step, with AdamW
and weight decay; ``sharded``: its weights were ``DTensor`` shards; ``steps``: the steps it trained);
``PruningTrainer`` saves the model into ``OUT/saved`` with ``save_model`` (weights, config and masks, for
``load_pruned``); a plain ``Trainer`` saves its last checkpoint (``OUT/trainer/checkpoint-6``, the callback
adding the masks).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.helpers`

import hf_gradprune.structured.importance
import hf_gradprune.weights.scoring
from hf_gradprune import GradientPruningCallback, PruningArguments, PruningTrainer
from hf_gradprune.core.mask_files import save_masks
from hf_gradprune.core.masks import get_masks
from hf_gradprune.core.sharding import local_part
from tests.helpers import VOCAB, build_tiny, leave_process_group

NUM_ROWS, LENGTH, MAX_STEPS, KILL_STEP = 64, 12, 6, 4
HUB_REPO, HUB_TOKEN = "test-user/fsdp-pruned", "hf_fsdp_test_token"


def dataset(causal: bool) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (NUM_ROWS, LENGTH), generator=generator)
    labels = ids.tolist() if causal else torch.randint(0, 2, (NUM_ROWS,), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


class ZeroCheck(TrainerCallback):
    """After every step (the pruning callback has re-masked), whether each masked entry of this rank's
    shards is exactly zero; at step ``KILL_STEP`` of a ``kill`` run, SIGKILL once the checkpoint is saved."""

    def __init__(self, kill: bool):
        self.zero, self.sharded, self.kill, self.steps = True, True, kill, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        params = dict(kwargs["model"].named_parameters())
        for name, mask in get_masks(kwargs["model"]).items():
            param = params[name].detach()
            self.sharded &= isinstance(param, DTensor)
            if isinstance(param, DTensor):
                param, mask = param.to_local(), local_part(mask, param)
            self.zero &= bool((param[~mask] == 0).all())

    def on_save(self, args, state, control, **kwargs):
        if self.kill and state.global_step == KILL_STEP:
            dist.barrier()  # both ranks' parts of the checkpoint are written
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    run, family, criterion, pattern, *rest = mode.split(",")
    trainer_kind, *precision = rest or ["pruning"]
    sharded = run != "single"
    if run == "control":  # each rank scores on its own examples only
        hf_gradprune.weights.scoring.sum_into_shard = local_part
        for scoring in (hf_gradprune.structured.importance, hf_gradprune.weights.scoring):
            scoring.all_reduce_sum = lambda tensor: tensor
    config = {"fsdp_version": 2}
    if (
        family == "bert"
    ):  # BERT declares no blocks: accelerate's default policy would shard the embeddings twice
        config["transformer_layer_cls_to_wrap"] = ["BertLayer"]
    fsdp = {"fsdp": True, "fsdp_config": config} if sharded else {}
    args = TrainingArguments(
        **fsdp,
        output_dir=str(out / "trainer"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4 if sharded else 8,
        learning_rate=1e-2,
        weight_decay=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="steps" if run in ("kill", "resume", "push") or trainer_kind == "callback" else "no",
        save_steps={"kill": KILL_STEP, "resume": KILL_STEP, "push": 3}.get(run, MAX_STEPS),
        **({"push_to_hub": True, "hub_model_id": HUB_REPO, "hub_token": HUB_TOKEN} if run == "push" else {}),
        disable_tqdm=True,
        # BERT's classification loss is a mean over its examples: not scaled by the number of processes
        average_tokens_across_devices=False,
        bf16=precision == ["bf16"],  # FSDP2: bf16 parameters in forward and backward, float32 shards
        seed=0,
        data_seed=0,
    )
    if sharded:  # the one line: accelerate's FSDP path, which it reserves for accelerators, on CPU
        PartialState()._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if family == "bert" else {}
    model = build_tiny(family, intermediate_size=44 if pattern == "2:4" else 37, **dropout).train()
    sparsity = {
        "per_tensor": {"weight_sparsity": 0.5},
        "linear": {
            "weight_sparsity": 0.5,
            "sparsity_schedule": "linear",
            "sparsity_schedule_end": 4,
            "sparsity_schedule_frequency": 2,
        },
        "flops": {
            "weight_sparsity": 0.5,
            "target_flops_ratio": 0.5,
            "flops_seq_len": LENGTH,
            "mask_tuning": True,
        },
    }.get(pattern, {"sparsity_pattern": pattern})
    pruning_args = PruningArguments(
        **sparsity, weight_importance=criterion, prune_steps="0", importance_batches=2
    )
    check = ZeroCheck(kill=run == "kill")
    common = {"model": model, "args": args, "train_dataset": dataset(family != "bert")}
    if trainer_kind == "pruning":
        trainer = PruningTrainer(**common, pruning_args=pruning_args, callbacks=[check])
        trainer.pruning_callback.show_progress = False
    else:
        pruning = GradientPruningCallback(pruning_args, show_progress=False)
        trainer = Trainer(**common, callbacks=[pruning, check])
    resume = str(out / "trainer" / f"checkpoint-{KILL_STEP}") if run == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    rank = args.process_index
    save_masks(get_masks(trainer.model), out / f"masks_rank{rank}.safetensors")
    result = {
        "zero": check.zero,
        "sharded": check.sharded,
        "fsdp": trainer.is_fsdp_enabled,
        "steps": check.steps,
    }
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    if trainer_kind == "pruning":
        trainer.save_model(str(out / "saved"))
    if run == "push":
        trainer.push_to_hub()
    if sharded:
        leave_process_group()


if __name__ == "__main__":
    main()
