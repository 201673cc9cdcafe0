"""Masked fine-tuning of the real SmolLM2-135M sharded with FSDP2 (``fully_shard``) on two processes, against
one process: memory per rank, masks held on every shard, the same weights, one checkpoint anyone loads.

The dense model (GGUF, float32) is pruned once in this process (50% per row, Wanda, one shot, 2 calibration
batches) and saved with ``save_pruned``. Then the same masked fine-tune runs twice, each in fresh processes
that load that folder with ``load_pruned``: ``--steps`` AdamW steps (lr 1e-4, weight decay 0.01) on batches
of 4 x 128 review tokens, ``reapply_masks`` after each step; once in one process on the whole batch, once
with ``torchrun --nproc_per_node 2`` (gloo, CPU, one thread each), every block and the model sharded with
``fully_shard``, masks applied after sharding, each rank on its 2 rows of each batch. Peak resident memory
during training is sampled every 2 ms per process and reported as a multiple of the float32 model. Rank 0
gathers the full state dict and saves it with ``save_pruned``; this process reloads it with ``load_pruned``
and checks every row still exactly half zero, the weights against the one-process run, and the held-out
perplexity of both.

Run: ``.venv/bin/python benchmarks/fsdp.py`` (``--quick`` for a smoke run), and with
``MALLOC_MMAP_THRESHOLD_=65536`` for what training needs rather than what glibc keeps. Writes
``results/fsdp.{json,png}`` (``results/fsdp_mmap_threshold.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_gradprune import load_pruned, prune_weights, save_pruned
from hf_gradprune.core.adapters import get_adapter
from hf_gradprune.core.masks import get_masks
from hf_gradprune.testing import load_rotten_tomatoes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, PeakMemory, load_causal_lm_example, resident_bytes, results_header, write_results

# glibc keeps freed heap memory (see scale.py): MALLOC_MMAP_THRESHOLD_=65536 shows what training needs.
NAME = "fsdp" + ("_mmap_threshold" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "")
#: The code whose change makes these results stale (``benchmarks/figures.py`` warns).
MEASURES = (
    "src/hf_gradprune/weights/sparsity.py",
    "src/hf_gradprune/core/sharding.py",
    "src/hf_gradprune/core/masks.py",
    "src/hf_gradprune/core/mask_files.py",
    "src/hf_gradprune/weights/criteria.py",
    "src/hf_gradprune/io/checkpoint.py",
    "src/hf_gradprune/io/folders.py",
    "src/hf_gradprune/io/saving.py",
)
SEQ_LEN = 128


def data(tokenizer, count: int, eval_batches: int) -> tuple[list[dict], list[dict]]:
    """Training batches of 4 x 128 review tokens and held-out ones."""
    example = load_causal_lm_example()
    reviews = load_rotten_tomatoes()
    train = example.text_batches(tokenizer, reviews["train"]["text"], count, 4, SEQ_LEN)
    held_out = example.text_batches(tokenizer, reviews["test"]["text"], eval_batches, 4, SEQ_LEN)
    return train, held_out


def worker(folder: Path, out: Path, steps: int, sharded: bool) -> None:
    """The masked fine-tune in this process (one rank of two when ``sharded``)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from hf_gradprune.core.masks import apply_masks, reapply_masks

    torch.set_num_threads(1)
    torch.manual_seed(0)
    baseline = resident_bytes()
    model = load_pruned(folder)
    train, _ = data(AutoTokenizer.from_pretrained(folder), steps, 0)
    rank, world = 0, 1
    if sharded:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for block in get_adapter(model).blocks(model):
            fully_shard(block)
        fully_shard(model)
        apply_masks(model, get_masks(model))  # the sharded parameters get their local masks and hooks
    loaded = resident_bytes()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    start = time.perf_counter()
    with PeakMemory() as memory:
        for batch in train:
            ids = batch["input_ids"].chunk(world)[rank]
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            reapply_masks(model)
    seconds = (time.perf_counter() - start) / len(train)
    result = {"rank": rank, "baseline": baseline, "loaded": loaded, "peak": memory.peak, "step_s": seconds}
    if sharded:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results = [None] * world
        dist.all_gather_object(results, result)
    else:
        state, results = model.state_dict(), [result]
    if rank == 0:
        masks = get_masks(model)
        del model, optimizer
        fresh = load_pruned(folder)
        fresh.load_state_dict(state)
        save_pruned(fresh, out)  # the masks it was loaded with: the same as the run's
        assert all(torch.equal(mask, get_masks(fresh)[name]) for name, mask in masks.items())
        (out / "memory.json").write_text(json.dumps(results))
    if sharded:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(folder: Path, out: Path, steps: int, sharded: bool) -> list[dict]:
    """Run :func:`worker` in fresh processes; the memory and timing of each."""
    command = [sys.executable]
    if sharded:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    command += [__file__, "--worker", str(folder), str(out), str(steps), "1" if sharded else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads((out / "memory.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_batches = 2, 1
    started = time.perf_counter()
    example = load_causal_lm_example()
    dense, tokenizer = example.load_smollm2()
    model_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    calibration, held_out = data(tokenizer, 2, args.eval_batches)
    prune_weights(dense, calibration, 0.5, method="wanda", scope="per_row", show_progress=False)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pruned"
        save_pruned(dense, folder)
        tokenizer.save_pretrained(folder)
        before = example.perplexity(dense, held_out)
        del dense
        for name, sharded in (("one process", False), ("FSDP2, 2 processes", True)):
            out = Path(tmp) / name.split(",")[0].replace(" ", "_")
            ranks = launch(folder, out, args.steps, sharded)
            model = load_pruned(out)
            rows_exact = all(
                bool((mask.sum(dim=1) == mask.shape[1] // 2).all()) for mask in get_masks(model).values()
            )
            zero = all(bool((model.get_parameter(n)[~m] == 0).all()) for n, m in get_masks(model).items())
            runs[name] = {
                "ranks": [
                    {
                        "rank": r["rank"],
                        "peak_total": (r["peak"] - r["baseline"]) / model_bytes,
                        "loaded": (r["loaded"] - r["baseline"]) / model_bytes,
                        "step_seconds": round(r["step_s"], 2),
                    }
                    for r in ranks
                ],
                "every_row_half_zero_after_reload": rows_exact,
                "masked_weights_zero_after_reload": zero,
                "perplexity": example.perplexity(model, held_out),
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
            print(json.dumps({k: v for k, v in runs[name].items() if k != "state"}), flush=True)
    single, sharded_run = runs["one process"].pop("state"), runs["FSDP2, 2 processes"].pop("state")
    difference = max((single[k] - sharded_run[k]).abs().max().item() for k in single)
    results = {
        **results_header(NAME, args),
        "model_bytes": model_bytes,
        "perplexity_pruned_before_training": before,
        "runs": runs,
        "max_weight_difference": difference,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    write_results(results, args, plot)
    print(json.dumps({k: v for k, v in results.items() if k not in ("machine", "settings")}, indent=1))


def plot(results: dict, path: Path) -> None:
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names, peaks = [], []
    for name, run in results["runs"].items():
        for rank in run["ranks"]:
            names.append(f"{name}\nrank {rank['rank']}" if len(run["ranks"]) > 1 else name)
            peaks.append(rank["peak_total"])
    axes.bar(names, peaks, color="tab:blue")
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="the model (fp32)")
    axes.set_ylabel("peak resident memory in training (x fp32 model)")
    axes.set_title("SmolLM2-135M, 50% masked, AdamW: one process vs FSDP2 on two")
    axes.tick_params(axis="x", labelsize=8)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
    else:
        main()
