"""Scripts shaped like transformers' examples (run_glue, run_clm, run_image_classification), written for the
``Trainer`` and changed only where ``# hf_gradprune`` marks it, run to their own endings: the card that lands
says what was pruned and names no machine path, and the pushed model reloads in a fresh process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from huggingface_hub import ModelCard
from PIL import Image

from hf_gradprune.testing import LocalHub, load_mnist_5k, load_rotten_tomatoes, minilm_path, smollm2_gguf

pytestmark = [pytest.mark.real, pytest.mark.slow]

SCRIPTS = Path(__file__).parent / "scripts"
TOKEN = "secret"
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0"]
PRUNING_FACTS = ("hf_gradprune", "Zero weights in the pruned layers", "## Sparsity per module type")


def run_script(
    name: str, flags: list[str], env: dict[str, str] | None = None, script: str | None = None
) -> str:
    """Run ``tests/scripts/<name>`` (or the text ``script``) in a fresh process; its stderr (the logs)."""
    command = [sys.executable, str(SCRIPTS / name)] if script is None else [sys.executable, "-c", script]
    result = subprocess.run(
        [*command, *flags], capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def assert_no_machine_path(text: str, *paths: Path) -> None:
    for path in (*paths, Path(transformers.__file__).parents[1]):
        assert str(path) not in text, f"{path} in the card"


PUSHED = """
import json, sys, torch
from huggingface_hub import HfApi, ModelCard
from hf_gradprune import load_pruned
repo, local = sys.argv[1], sys.argv[2]
pushed, saved = load_pruned(repo), load_pruned(local)
same = pushed.state_dict().keys() == saved.state_dict().keys() and all(
    torch.equal(v, saved.state_dict()[k]) for k, v in pushed.state_dict().items())
print(json.dumps({"card": ModelCard.load(repo).content, "files": HfApi().list_repo_files(repo),
                  "commits": [c.title for c in HfApi().list_repo_commits(repo)], "same": same}))
"""


def pushed(hub_env: dict[str, str], repo_id: str, local: Path) -> dict:
    """The pushed card, files and commits, and whether ``load_pruned`` of the pushed model, in a fresh
    process, gives every tensor of ``load_pruned`` of the local folder."""
    result = subprocess.run(
        [sys.executable, "-c", PUSHED, repo_id, str(local)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **hub_env},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture
def hub_env(tmp_path: Path):
    """The environment of a process whose Hub is a fresh LocalHub, with a token."""
    with LocalHub(tmp_path / "hub", token=TOKEN) as server:
        yield server.client_env(tmp_path / "home", TOKEN)


# --- run_glue ---------------------------------------------------------------------------------------------


def write_reviews_csv(folder: Path) -> dict[str, Path]:
    """Real reviews as csv files with three string labels: short reviews, and long ones rotten or fresh."""
    data = load_rotten_tomatoes()
    files = {}
    for split, source, rows in (
        ("train", "train", range(96)),
        ("validation", "test", range(32)),
        ("test", "test", range(32, 48)),
    ):
        rows = data[source].select(rows)
        files[split] = folder / f"{split}.csv"
        with files[split].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label"])
            for text, label in zip(rows["text"], rows["label"], strict=True):
                writer.writerow([text, "short" if len(text) < 80 else ("fresh" if label else "rotten")])
    return files


def glue_flags(files: dict[str, Path], out: Path, max_steps: int) -> list[str]:
    return [
        *("--model_name_or_path", str(minilm_path()), "--output_dir", str(out)),
        *("--train_file", str(files["train"]), "--validation_file", str(files["validation"])),
        *("--test_file", str(files["test"]), "--task_name", "mrpc", "--max_seq_length", "64"),
        *("--do_train", "--do_eval", "--do_predict", "--max_steps", str(max_steps)),
        *("--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"),
        *("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", *QUIET),
        *("--prune_heads_per_layer", "1", "--weight_sparsity", "0.5", "--importance_batches", "1"),
    ]


def test_glue_style_script_prunes_resumes_and_ends_with_the_pruning_card_both_ways(hub_env, tmp_path):
    files = write_reviews_csv(tmp_path)
    out = tmp_path / "glue"
    run_script("glue_style.py", glue_flags(files, out, max_steps=4))

    # The create_model_card ending: the pruning card, with run_glue's fields merged in.
    card = (out / "README.md").read_text()
    assert all(fact in card for fact in PRUNING_FACTS) and "Attention heads removed:** 6 of 72" in card
    assert "a local checkpoint" in card and "base_model:" not in card
    assert "GLUE MRPC ([`glue`](https://huggingface.co/datasets/glue))" in card
    assert "language:\n- en" in card and "pipeline_tag: text-classification" in card
    result = ModelCard.load(out / "README.md").data.eval_results[0]
    assert (result.dataset_name, result.dataset_type, result.dataset_config) == ("GLUE MRPC", "glue", "mrpc")
    assert result.metric_type == "accuracy" and "# glue\n" in card
    assert "### Training hyperparameters" in card and "- training_steps: 4" in card
    assert "### Training results" in card and "| Validation Loss | Accuracy |" in card
    assert "- Datasets " in card and "- Tokenizers " in card
    assert_no_machine_path(card, tmp_path)
    assert {"train_results.json", "eval_results.json", "trainer_state.json", "predict_results.txt"} <= {
        p.name for p in out.iterdir()
    }
    assert len((out / "predict_results.txt").read_text().splitlines()) == 17

    # Run again with more steps and --push_to_hub: resumes from checkpoint-4, then the push_to_hub ending.
    flags = [
        *glue_flags(files, out, max_steps=6),
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "test-user/glue",
    ]
    logs = run_script("glue_style.py", flags, env=hub_env)
    assert "resuming training at" in logs and "checkpoint-4" in logs
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    landed = pushed(hub_env, "test-user/glue", out)
    assert landed["same"]
    assert landed["commits"][0] == "End of training"
    assert {"model.safetensors", "pruning_masks.safetensors", "README.md", "tokenizer.json"} <= set(
        landed["files"]
    )
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in landed["files"])
    assert all(fact in landed["card"] for fact in PRUNING_FACTS) and "test-user/glue" in landed["card"]
    assert "- training_steps: 6" in landed["card"]
    assert_no_machine_path(landed["card"], tmp_path)


PLAIN = {  # the lines that make the script prune, and what a plain Trainer script has instead
    "from hf_gradprune import PruningArguments, PruningTrainer\n": "from transformers import Trainer\n",
    "    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments, PruningArguments)  "
    "# hf_gradprune\n": "    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments)\n",
    "    model_args, data_args, training_args, pruning_args = parser.parse_args_into_dataclasses()  "
    "# hf_gradprune\n": "    model_args, data_args, training_args = parser.parse_args_into_dataclasses()\n",
    "    trainer = PruningTrainer(  # hf_gradprune\n": "    trainer = Trainer(\n",
    "        pruning_args=pruning_args,  # hf_gradprune\n": "",
}


@pytest.mark.parametrize("name", ["glue_style.py", "clm_style.py", "image_classification_style.py"])
def test_scripts_differ_from_a_trainer_script_only_in_the_marked_lines(name):
    text = (SCRIPTS / name).read_text()
    marked = [line + "\n" for line in text.splitlines() if line.endswith("# hf_gradprune")]
    assert marked and all(line in PLAIN for line in marked), marked
    assert all(old in text for old in PLAIN)


def test_glue_style_script_as_a_plain_trainer_script_writes_no_pruning_card(tmp_path):
    """The control: the same script with the marked lines undone runs, and its card has no pruning facts."""
    script = (SCRIPTS / "glue_style.py").read_text()
    for old, new in PLAIN.items():
        script = script.replace(old, new)
    files = write_reviews_csv(tmp_path)
    flags = [
        *glue_flags(files, tmp_path / "plain", max_steps=2)[:-6],
        *("--save_strategy", "no", "--eval_strategy", "no"),
    ]
    run_script("", flags, script=script)
    card = (tmp_path / "plain" / "README.md").read_text()
    assert not any(fact in card for fact in PRUNING_FACTS[1:])


# --- run_clm ----------------------------------------------------------------------------------------------


def tiny_llama_with_smollm2_tokenizer(folder: Path) -> Path:
    """A small Llama with SmolLM2's real tokenizer, saved as a model folder a script takes."""
    gguf_folder, gguf_file = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clm_style_script_prunes_heads_and_weights_and_pushes_the_pruning_card(hub_env, tmp_path):
    model = tiny_llama_with_smollm2_tokenizer(tmp_path / "base")
    reviews = load_rotten_tomatoes()
    for split, rows in (("train", reviews["train"][:300]), ("validation", reviews["test"][:60])):
        (tmp_path / f"{split}.txt").write_text("\n".join(rows["text"]))
    out = tmp_path / "clm"
    flags = [
        *("--model_name_or_path", str(model), "--output_dir", str(out), "--block_size", "32"),
        *("--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "validation.txt")),
        *("--dataset_name", "rotten_tomatoes", "--do_train", "--do_eval", "--max_steps", "3"),
        *("--per_device_train_batch_size", "4", "--save_strategy", "no", *QUIET),
        *("--prune_heads_per_layer", "1", "--weight_sparsity", "0.5", "--importance_batches", "1"),
        *("--push_to_hub", "true", "--hub_model_id", "test-user/clm"),
    ]
    run_script("clm_style.py", flags, env=hub_env)
    assert "perplexity" in json.loads((out / "eval_results.json").read_text())
    landed = pushed(hub_env, "test-user/clm", out)
    assert landed["same"]
    card = landed["card"]
    assert all(fact in card for fact in PRUNING_FACTS) and "Attention heads removed:** 2 of 8" in card
    assert "pipeline_tag: text-generation" in card and "datasets:\n- rotten_tomatoes" in card
    assert "a local checkpoint" in card
    assert_no_machine_path(card, tmp_path)


# --- run_image_classification -----------------------------------------------------------------------------


def write_digit_folders(folder: Path) -> dict[str, Path]:
    """Real MNIST digits 0, 1 and 2 as PNG files in one folder per class."""
    data = load_mnist_5k()
    folders = {}
    for split, source, count in (("train", "train", 20), ("validation", "test", 6)):
        folders[split] = folder / split
        seen = dict.fromkeys(range(3), 0)
        for index, (pixels, label) in enumerate(
            zip(data[source]["pixel_values"], data[source]["labels"], strict=True)
        ):
            if label in seen and seen[label] < count:
                seen[label] += 1
                target = folders[split] / str(label) / f"{index}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((np.asarray(pixels)[0] * 255).astype(np.uint8)).save(target)
    return folders


def small_resnet(folder: Path) -> Path:
    """A small ResNet (a CNN of transformers) for one-channel 28x28 images, with its image processor."""
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    processor = transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_pct=1.0, image_mean=[0.5], image_std=[0.5]
    )
    processor.save_pretrained(folder)
    return folder


def test_image_classification_style_script_prunes_a_cnn_and_pushes_the_pruning_card(hub_env, tmp_path):
    folders = write_digit_folders(tmp_path / "digits")
    out = tmp_path / "cnn"
    flags = [
        *("--model_name_or_path", str(small_resnet(tmp_path / "resnet")), "--output_dir", str(out)),
        *("--train_dir", str(folders["train"]), "--validation_dir", str(folders["validation"])),
        *("--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "8"),
        *("--remove_unused_columns", "false", "--save_strategy", "no", *QUIET),
        *("--weight_sparsity", "0.5", "--weight_importance", "taylor", "--importance_batches", "1"),
        *("--push_to_hub", "true", "--hub_model_id", "test-user/cnn"),
    ]
    run_script("image_classification_style.py", flags, env=hub_env)
    landed = pushed(hub_env, "test-user/cnn", out)
    assert landed["same"] and "pruning_masks.safetensors" in landed["files"]
    card = landed["card"]
    assert all(fact in card for fact in PRUNING_FACTS) and "pipeline_tag: image-classification" in card
    assert "- vision" in card and "a local checkpoint" in card and "| accuracy |" in card
    assert_no_machine_path(card, tmp_path)
