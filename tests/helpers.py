"""Plain helpers for the tests: tiny models of every family, batches, fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from transformers import PreTrainedModel

from hf_gradprune import get_adapter
from hf_gradprune.testing import minilm_path

VOCAB = 99
# A wide initializer makes heads matter visibly in logits (0.02 leaves them near zero).
INIT = {"initializer_range": 0.3}
TINY = {**INIT, "vocab_size": VOCAB, "num_hidden_layers": 3, "intermediate_size": 37}
ENCODER = {**TINY, "hidden_size": 32, "num_attention_heads": 4}
DECODER = {**ENCODER, "num_key_value_heads": 2, "pad_token_id": 0}

# model_type -> (model class, config class, config kwargs). Every registered family must appear here.
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", ENCODER),
    "roberta": (
        "RobertaForSequenceClassification",
        "RobertaConfig",
        {**ENCODER, "max_position_embeddings": 40},
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        {**INIT, "vocab_size": VOCAB, "dim": 32, "n_layers": 3, "n_heads": 4, "hidden_dim": 37},
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {
            **INIT,
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 3,
            "n_head": 4,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", DECODER),
    "mistral": ("MistralForCausalLM", "MistralConfig", DECODER),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DECODER),
}


def build_tiny(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random model of ``model_type`` in eval mode; ``overrides`` change its config."""
    model_name, config_name, kwargs = TINY_MODELS[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    return getattr(transformers, model_name)(config).eval()


def removable(model_type: str) -> tuple[dict, dict]:
    """Two successive cuts for the tiny model (whole kv groups of 2 under GQA)."""
    config = build_tiny(model_type).config
    adapter = get_adapter(config)
    if adapter.group_size(adapter.structure("heads"), config) > 1:
        return {0: [0, 1], 1: [2, 3]}, {2: [0, 1]}
    return {0: [1], 1: [3]}, {0: [2], 2: [0, 1, 2]}


def is_causal_lm(model: PreTrainedModel) -> bool:
    return "CausalLM" in type(model).__name__ or "LMHead" in type(model).__name__


def tiny_batch(model: PreTrainedModel, batch_size: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Random token ids with labels suited to the model's head."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if is_causal_lm(model):
        batch["labels"] = input_ids.clone()
    else:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=generator)
    return batch


def logits(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` without labels, no grad."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def load_minilm(seed: int = 0) -> transformers.BertForSequenceClassification:
    """The real MiniLM encoder with a (seeded) 2-label classification head, eval mode."""
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()


def run_fresh(script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run ``script`` in a fresh Python process (``sys.executable``) and return its stdout; fail on error."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        pytest.fail(f"fresh process failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


RELOAD_LOGITS = """
import sys, torch
from hf_gradprune import load_pruned
model = load_pruned(sys.argv[1])
batch = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(**batch).logits
torch.save(out, sys.argv[3])
"""


def fresh_reload_logits(
    folder: str | Path, batch: dict, tmp_path: Path, env: dict | None = None
) -> torch.Tensor:
    """Logits of ``load_pruned(folder)`` computed in a fresh process on ``batch`` (labels dropped)."""
    torch.save({k: v for k, v in batch.items() if k != "labels"}, tmp_path / "batch.pt")
    run_fresh(RELOAD_LOGITS, str(folder), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt"), env=env)
    return torch.load(tmp_path / "logits.pt")


def tiny_dataset(rows: int = 64, length: int = 8, seed: int = 0, causal: bool = False):
    """A ``datasets.Dataset`` of random token ids with labels (sequence labels, or the ids for causal LMs)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    labels = ids if causal else torch.randint(0, 2, (rows,), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


#: A schedule that does everything mid-run: one head per layer over cuts at steps 0 and 6, weight sparsity
#: ramping linearly to 0.6 over steps 0..10 every 2 steps (12 steps, checkpoints every 4 in the tests).
RAMP_PRUNING = {
    "prune_heads_per_layer": 1,
    "prune_steps": "0,6",
    "weight_sparsity": 0.6,
    "sparsity_schedule": "linear",
    "sparsity_schedule_end": 10,
    "sparsity_schedule_frequency": 2,
    "importance_batches": 2,
}


def quiet_cpu_args(output_dir: Path, max_steps: int = 2, **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` for a short CPU run of batches of 8 that reports, saves and prints nothing."""
    settings = {
        "max_steps": max_steps,
        "per_device_train_batch_size": 8,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return transformers.TrainingArguments(str(output_dir), **{**settings, **overrides})


def leave_process_group() -> None:
    """End a worker of a multi-process test once every rank has written its files: wait for the others, then
    exit at once. gloo's teardown now and then hangs in ``destroy_process_group`` (pytorch/pytorch#75097)
    or aborts at interpreter exit, after the work is done: the test would fail on what it does not test."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
