"""The real SmolLM2-135M pruned and fine-tuned through ``PruningTrainer`` with the Trainer's own FSDP2 path on
two processes, against the same run in one process: masks, memory per rank, weights, one checkpoint.

The dense model (GGUF, float32) is saved once as safetensors with ``--rows`` rows of 128 review tokens. Each
run loads it with ``from_pretrained`` in fresh processes and trains ``PruningTrainer`` for ``--steps`` AdamW
steps (lr 1e-4, weight decay 0.01) with ``--weight_importance obd --weight_sparsity 0.5`` per tensor, one
shot at step 0 on ``--importance_batches`` batches (every row once): once in one process (batches of 4),
once under ``torchrun --nproc_per_node 2`` with ``fsdp=True, fsdp_config={"fsdp_version": 2}`` (gloo, CPU,
one thread each; batches of 2 per rank, the same 4 rows per step), where accelerate shards every block and
the importance, the per-tensor thresholds and the masks are computed on the shards. accelerate takes its
FSDP path only on accelerators: the worker tells it the CPU processes are such a group (one line, as
``tests/fsdp_trainer_worker.py`` does). Peak resident memory per process, as a multiple of the float32
model, is sampled every 2 ms through scoring (until step 0 begins) and through the whole run.
``save_model`` writes the folder; this process reloads each with ``load_pruned`` and compares the masks,
the weights and the held-out perplexity (dense model beside them).

Run: ``.venv/bin/python benchmarks/fsdp_trainer.py`` (``--quick`` for a smoke run). Writes
``results/fsdp_trainer.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file

from hf_gradprune import load_pruned
from hf_gradprune.core.masks import get_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, PeakMemory, load_causal_lm_example, resident_bytes, results_header, write_results
from fsdp import data, free_port

NAME = "fsdp_trainer" + ("_mmap_threshold" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "")
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/training/trainer.py",
    "src/hf_gradprune/training/checkpoints.py",
    "src/hf_gradprune/training/callback.py",
    "src/hf_gradprune/training/reporting.py",
    "src/hf_gradprune/core/sharding.py",
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
    "src/hf_gradprune/io/checkpoint.py",
    "src/hf_gradprune/io/folders.py",
    "src/hf_gradprune/io/saving.py",
)
#: Resident memory above the process's start, as multiples of the float32 model: the peak through loading
#: and (FSDP2) sharding, at train begin, the peak from there through scoring and through the training steps.
MEMORY = ("peak_prepare", "train_begin", "peak_scoring", "peak_training")


def worker(folder: Path, out: Path, args: argparse.Namespace, sharded: bool) -> None:
    """One run of ``PruningTrainer`` in this process (one rank of two when ``sharded``)."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from hf_gradprune import PruningArguments, PruningTrainer

    class Stages(TrainerCallback):
        """Memory at train begin (the model loaded and, under FSDP2, sharded), then the peak from there to
        step 0's begin: the pruning callback, first in the list, has scored and masked by then."""

        def __init__(self, memory: PeakMemory):
            self.memory, self.seen = memory, {}

        def on_train_begin(self, _args, state, control, **kwargs):
            self.seen["peak_prepare"], self.seen["train_begin"] = self.memory.peak, resident_bytes()
            self.memory.peak = self.seen["train_begin"]

        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == 0:
                self.seen["peak_scoring"] = self.memory.peak

    torch.set_num_threads(1)
    baseline = resident_bytes()
    training = TrainingArguments(
        **({"fsdp": True, "fsdp_config": {"fsdp_version": 2}} if sharded else {}),
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=2 if sharded else 4,
        learning_rate=1e-4,
        weight_decay=0.01,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    if sharded:  # accelerate's FSDP path, which it reserves for accelerators, on CPU
        PartialState()._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = load_file(folder / "rows.safetensors")["input_ids"].tolist()
    pruning = PruningArguments(
        weight_sparsity=0.5,
        weight_importance="obd",
        sparsity_scope="per_tensor",
        prune_steps="0",
        importance_batches=args.importance_batches,
    )
    with PeakMemory() as memory:
        stages = Stages(memory)
        trainer = PruningTrainer(
            model=model,
            args=training,
            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            pruning_args=pruning,
            callbacks=[stages],
        )
        trainer.pruning_callback.show_progress = False
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {
        "rank": training.process_index,
        "fsdp": trainer.is_fsdp_enabled,
        **{stage: value - baseline for stage, value in stages.seen.items()},
        "peak_training": memory.peak - baseline,
        "train_seconds": round(seconds, 1),
    }
    results = [result]
    if sharded:
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
    trainer.save_model(str(out / "saved"))
    if training.process_index == 0:
        (out / "memory.json").write_text(json.dumps(results))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def launch(folder: Path, out: Path, args: argparse.Namespace, sharded: bool) -> list[dict]:
    """Run :func:`worker` in fresh processes; each process's memory and timing."""
    command = [sys.executable]
    if sharded:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    command += [__file__, "--worker", str(folder), str(out), "1" if sharded else "0"]
    command += ["--steps", str(args.steps), "--importance_batches", str(args.importance_batches)]
    result = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"the {'FSDP2' if sharded else 'one-process'} run failed:\n{result.stderr[-4000:]}"
        )
    return json.loads((out / "memory.json").read_text())


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="AdamW steps of 4 rows after the cut")
    parser.add_argument("--importance_batches", type=int, default=8, help="obd batches of 4 rows")
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "OUT", "SHARDED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.importance_batches, args.eval_batches = 2, 2, 1
    return args


def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    example = load_causal_lm_example()
    dense, tokenizer = example.load_smollm2()
    model_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    rows = max(args.steps, args.importance_batches)
    train, held_out = data(tokenizer, rows, args.eval_batches)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dense"
        dense.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_file({"input_ids": torch.cat([b["input_ids"] for b in train])}, str(folder / "rows.safetensors"))
        dense_perplexity = example.perplexity(dense, held_out)
        del dense
        for name, sharded in (("one process", False), ("FSDP2, 2 processes", True)):
            out = Path(tmp) / ("fsdp" if sharded else "single")
            ranks = launch(folder, out, args, sharded)
            model = load_pruned(out / "saved")
            masks = get_masks(model)
            runs[name] = {
                "ranks": [
                    {
                        **{k: v for k, v in r.items() if k not in MEMORY},
                        **{k: round(r[k] / model_bytes, 2) for k in MEMORY},
                    }
                    for r in ranks
                ],
                "masked_tensors": len(masks),
                "kept_fraction_per_tensor": [
                    round(min(float(m.float().mean()) for m in masks.values()), 4),
                    round(max(float(m.float().mean()) for m in masks.values()), 4),
                ],
                "masked_weights_zero_after_reload": all(
                    bool((model.get_parameter(n)[~m] == 0).all()) for n, m in masks.items()
                ),
                "perplexity": example.perplexity(model, held_out),
                "masks": masks,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
            print(
                json.dumps({k: v for k, v in runs[name].items() if k not in ("masks", "state")}), flush=True
            )
    single, sharded_run = runs["one process"], runs["FSDP2, 2 processes"]
    differing = sum(int((single["masks"][k] != sharded_run["masks"][k]).sum()) for k in single["masks"])
    masked = sum(m.numel() for m in single["masks"].values())
    kept = {k: single["masks"][k] & sharded_run["masks"][k] for k in single["masks"]}
    difference = max(  # where both runs keep the weight (one kept by one run only differs by itself)
        ((single["state"][k] - sharded_run["state"][k]) * kept.get(k, 1)).abs().max().item()
        for k in single["state"]
    )
    for run in runs.values():
        del run["masks"], run["state"]
    results = {
        **results_header(NAME, args),
        "model_bytes": model_bytes,
        "perplexity_dense": dense_perplexity,
        "runs": runs,
        "mask_entries_differing": differing,
        "mask_entries": masked,
        "max_weight_difference_where_both_keep": difference,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    compared = ("perplexity_dense", "mask_entries_differing", "max_weight_difference_where_both_keep")
    print(json.dumps({key: results[key] for key in (*compared, "runtime_s")}))


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels, bars = [], {"train_begin": [], "peak_scoring": [], "peak_training": []}
    for name, run in results["runs"].items():
        for rank in run["ranks"]:
            labels.append(f"{name}\nrank {rank['rank']}" if len(run["ranks"]) > 1 else name)
            for stage, values in bars.items():
                values.append(rank[stage])
    positions = range(len(labels))
    legend = {"train_begin": "at train begin", "peak_scoring": "obd scoring", "peak_training": "AdamW steps"}
    for offset, (stage, values) in zip((-0.27, 0, 0.27), bars.items(), strict=True):
        axes.bar([p + offset for p in positions], values, width=0.27, label=legend[stage])
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="the model (fp32)")
    axes.set_ylabel("peak resident memory (x fp32 model)")
    allocator = "MALLOC_MMAP_THRESHOLD_=65536" if "mmap" in results["benchmark"] else "default malloc"
    axes.set_title(
        f"SmolLM2-135M through PruningTrainer: one process vs FSDP2 on two ({allocator})", fontsize=10
    )
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    options = arguments()
    if options.worker:
        folder, out, sharded = options.worker
        worker(Path(folder), Path(out), options, sharded == "1")
    else:
        main(options)
