"""The example script as a user runs it, on the real MiniLM encoder and the real rotten_tomatoes reviews."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_gradprune import load_pruned
from hf_gradprune.core.masks import compute_sparsity
from hf_gradprune.testing import LocalHub
from hf_gradprune.testing.hub_store import Store
from hf_gradprune.training.checkpoints import TRAINING_ARGS_JSON

pytestmark = [pytest.mark.real, pytest.mark.slow]

SCRIPT = Path(__file__).parents[1] / "examples" / "text_classification.py"


def small_run(out: Path) -> list[str]:
    """Flags of a few-step run on a few reviews, pruning one head per layer and half of the weights."""
    return [
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "32",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "64",
        "--max_seq_length",
        "48",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--prune_heads_per_layer",
        "1",
        "--weight_sparsity",
        "0.5",
        "--weight_importance",
        "taylor",
        "--importance_batches",
        "2",
        "--learning_rate",
        "1e-4",
    ]


def test_example_prunes_heads_and_weights_and_reloads(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *small_run(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "pruning_results.json").read_text())
    assert results["heads_per_layer"] == [11] * 6
    assert {"eval_accuracy", "eval_f1"} <= results["eval_before"].keys() & results["eval_after"].keys()
    assert results["params_after"] < results["params_before"]
    assert (out / TRAINING_ARGS_JSON).is_file() and not (out / "training_args.bin").exists()

    model = load_pruned(out)
    layers = model.bert.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == [11] * 6
    targets = [n for n, p in model.named_parameters() if n.startswith("bert.encoder.layer") and p.dim() == 2]
    sparsity = compute_sparsity(model, targets)
    assert len(targets) == 36 and all(sparsity[name] == 0.5 for name in targets), sparsity
    assert torch.count_nonzero(model.bert.embeddings.word_embeddings.weight) > 0
    assert torch.count_nonzero(model.classifier.weight) == model.classifier.weight.numel()


def test_example_reads_csv_files_with_named_columns_and_prunes_to_a_flops_budget(tmp_path):
    import csv

    rows = [("a gripping, beautifully acted film", "pos"), ("dull, lifeless and far too long", "neg")] * 24
    for name in ("train.csv", "test.csv"):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "sentiment"])
            writer.writerows(rows)
    out = tmp_path / "run"
    flags = [
        *("--output_dir", str(out), "--train_file", str(tmp_path / "train.csv")),
        *("--validation_file", str(tmp_path / "test.csv"), "--text_column_name", "review"),
        *("--label_column_name", "sentiment", "--max_steps", "3", "--per_device_train_batch_size", "8"),
        *("--max_seq_length", "32", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"),
        *("--target_flops_ratio", "0.5", "--flops_seq_len", "32", "--mask_tuning", "true"),
        *("--importance_batches", "2", "--learning_rate", "1e-4"),
    ]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "pruning_results.json").read_text())
    assert 0.45 <= results["flops_ratio"] <= 0.5
    assert min(results["ffn_per_layer"]) < 1536 and results["eval_right_after_pruning"]["eval_accuracy"] >= 0
    model = load_pruned(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    card = (out / "README.md").read_text()
    assert "| accuracy |" in card and "Right after pruning" in card and "a local dataset" not in card


def test_example_exports_a_vanilla_model_that_plain_transformers_loads(tmp_path):
    out = tmp_path / "run"
    flags = [*small_run(out), "--prune_ffn_fraction", "0.25", "--export_vanilla", "true"]
    heads = flags.index("--prune_heads_per_layer")
    del flags[heads : heads + 2]  # BERT's head count cannot be said in a vanilla config
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "pruning_results.json").read_text())
    assert results["ffn_per_layer"] == [1152] * 6 and results["flops_ratio"] < 0.9
    code = (
        "import sys, transformers\n"
        "m = transformers.BertForSequenceClassification.from_pretrained(sys.argv[1])\n"
        "print(m.config.intermediate_size, 'hf_gradprune' in sys.modules, hasattr(m.config, 'hf_gradprune'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300
    )
    assert loaded.stdout.split() == ["1152", "False", "False"], loaded.stderr[-2000:]
    assert "BertForSequenceClassification.from_pretrained" in (out / "README.md").read_text()


def test_example_bad_data_flags_are_clear_errors(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--output_dir",
            str(tmp_path),
            "--train_file",
            "data.txt",
            "--validation_file",
            "data.txt",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "`--train_file` must be a .csv, .json or .jsonl file" in result.stderr


def test_example_push_to_hub_makes_one_commit(tmp_path):
    """With --push_to_hub the model, masks and card land in one commit (Trainer.save_model would push too)."""
    with LocalHub(tmp_path / "hub", token="secret") as hub:
        env = hub.client_env(tmp_path / "home", "secret")
        flags = [*small_run(tmp_path / "run"), "--push_to_hub", "true", "--hub_model_id", "test-user/example"]
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=900, env=env
        )
    assert result.returncode == 0, result.stderr[-4000:]
    store = Store(tmp_path / "hub")
    repo = store.repo("test-user/example")
    commits = list(store.history(repo, store.branch_head(repo, "main")))
    uploads = [commit for _, commit in commits if "model.safetensors" in commit["files"]]
    assert len(uploads) == 1, [commit["title"] for _, commit in commits]
    results = json.loads((tmp_path / "run" / "pruning_results.json").read_text())
    assert results["hub"]["commit"] == commits[0][0]
