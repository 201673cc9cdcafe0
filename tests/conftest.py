"""Shared fixtures: every registered family, the real shipped models and corpus."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from filelock import FileLock

from hf_gradprune import supported_model_types
from hf_gradprune.testing import load_rotten_tomatoes, minilm_path, smollm2_gguf

from .helpers import TINY_MODELS, load_minilm

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, and in the processes they start.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many cases the property-based tests generated (``tests/test_properties.py``)."""
    cases = {
        report.nodeid: value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "teardown"
        for key, value in getattr(report, "user_properties", ())
        if key == "generated_cases"
    }
    if cases:
        terminalreporter.write_line(
            f"property-based tests: {sum(cases.values())} generated cases in {len(cases)} tests"
        )


@pytest.fixture(params=supported_model_types())
def model_type(request: pytest.FixtureRequest) -> str:
    """Every registered model type (a family without a tiny builder fails here)."""
    assert request.param in TINY_MODELS, f"add a tiny config for {request.param!r} to tests/conftest.py"
    return request.param


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def rotten_tomatoes():
    return load_rotten_tomatoes()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture
def minilm() -> transformers.BertForSequenceClassification:
    return load_minilm()


@pytest.fixture
def review_batches(rotten_tomatoes, minilm_tokenizer) -> Callable[[int, int], list[dict]]:
    """``make(num_batches, batch_size)``: real tokenized rotten_tomatoes batches with labels."""

    def make(num_batches: int = 3, batch_size: int = 8) -> list[dict]:
        rows = rotten_tomatoes["train"].select(range(num_batches * batch_size))
        batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            encoded = minilm_tokenizer(
                chunk["text"], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            batches.append({**encoded, "labels": torch.tensor(chunk["label"])})
        return batches

    return make


@pytest.fixture(scope="session")
def _smollm2_loaded(tmp_path_factory: pytest.TempPathFactory):
    """The real SmolLM2-135M (GGUF, dequantised to float32) and its tokenizer, loaded once per session. Under
    pytest-xdist the first worker to need it saves the dequantised model for the others (about 35 s to
    dequantise on 2 cores, 2 s to load)."""
    folder, gguf_file = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _dequantized_smollm2(folder, gguf_file), tokenizer
    shared = tmp_path_factory.getbasetemp().parent / "smollm2-dequantized"  # this session's workers only
    with FileLock(f"{shared}.lock"):
        if (shared / "config.json").is_file():
            return transformers.AutoModelForCausalLM.from_pretrained(shared).eval(), tokenizer
        model = _dequantized_smollm2(folder, gguf_file)
        model.save_pretrained(shared)
    return model, tokenizer


def _dequantized_smollm2(folder: Path, gguf_file: str) -> transformers.PreTrainedModel:
    # dequantize=True gives a plain dense model (a model still tied to its GGUF quantizer cannot be saved).
    dequantized = transformers.GgufConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, quantization_config=dequantized
    ).eval()


@pytest.fixture
def smollm2(_smollm2_loaded):
    """A fresh copy of the real SmolLM2-135M and its tokenizer (tests prune it in place)."""
    model, tokenizer = _smollm2_loaded
    return copy.deepcopy(model), tokenizer
