"""Faults done for real: processes killed with SIGKILL while training and while saving."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_gradprune import PruningRecord, load_pruned, save_pruned
from hf_gradprune.core.masks import get_masks
from hf_gradprune.io.saving import PENDING_SAVE, finish_interrupted_save

WORKER = Path(__file__).with_name("fault_worker.py")


def run_worker(out_dir: Path, mode: str, loss: str = "task") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(out_dir), mode, loss], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("loss", ["task", "distill"])
def test_run_killed_mid_schedule_while_checkpointing_resumes_to_the_same_model(tmp_path, loss):
    full = run_worker(tmp_path / "full", "full", loss)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = run_worker(tmp_path / "run", "killed", loss)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = tmp_path / "run" / "out"
    assert (checkpoints / "checkpoint-8" / "model.safetensors").is_file()  # written, but cut short:
    assert not (checkpoints / "checkpoint-8" / "trainer_state.json").exists()
    resumed = run_worker(tmp_path / "run", "resume", loss)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Skipping" in resumed.stderr and "checkpoint-8" in resumed.stderr  # resumed from checkpoint-4
    # With distillation the teacher was saved once, when the run began, and read back on resuming.
    assert (tmp_path / "run" / "out" / "distillation_teacher").is_dir() == (loss == "distill")

    expected, again = load_pruned(tmp_path / "full" / "final"), load_pruned(tmp_path / "run" / "final")
    heads = PruningRecord.from_config(expected.config).pruned_heads
    assert PruningRecord.from_config(again.config).pruned_heads == heads
    assert len(heads) == 3 and all(len(units) == 1 for units in heads.values())
    masks, resumed_masks = get_masks(expected), get_masks(again)
    assert masks.keys() == resumed_masks.keys() and masks
    assert all(torch.equal(masks[k], resumed_masks[k]) for k in masks)
    assert all(int((~m).sum()) == round(0.6 * m.numel()) for m in masks.values())
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=1e-5, rtol=1e-4)


SAVE_BIG = """
import sys, torch
from transformers import BertConfig, BertForSequenceClassification
from hf_gradprune import save_pruned
torch.manual_seed(1)
model = BertForSequenceClassification(BertConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                                 intermediate_size=2048, vocab_size=30000))
print("SAVING", flush=True)
save_pruned(model, sys.argv[1])
"""


def small_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99
    )
    return BertForSequenceClassification(config).eval()


def test_save_killed_while_writing_leaves_the_previous_model_loadable(tmp_path):
    folder = tmp_path / "model"
    previous = small_bert(0)
    save_pruned(previous, folder)
    writer = subprocess.Popen(
        [sys.executable, "-c", SAVE_BIG, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "SAVING"
    deadline = time.monotonic() + 120
    # Kill it once the new save has begun writing into its temporary folder (160 MB take a while).
    while not any(folder.glob(".saving-*/*")):
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert list(folder.glob(".saving-*"))  # the part-written save is there...
    loaded = load_pruned(folder)  # ...and ignored, then removed: its process is dead
    assert not list(folder.glob(".saving-*"))
    for key, value in previous.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_save_killed_while_moving_its_files_is_completed_on_load(tmp_path):
    folder = tmp_path / "model"
    save_pruned(small_bert(0), folder)
    newer = small_bert(1)
    save_pruned(newer, tmp_path / "newer")
    # The state a save killed between its moves leaves: the whole new set renamed to .pending-save, one file
    # of it already moved into place.
    (tmp_path / "newer").rename(folder / PENDING_SAVE)
    (folder / PENDING_SAVE / "config.json").replace(folder / "config.json")
    loaded = load_pruned(folder)
    assert not (folder / PENDING_SAVE).exists()
    for key, value in newer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert finish_interrupted_save(folder) is False


@pytest.mark.parametrize("bad", ["resume_from_checkpoint", "explicit"])
def test_resume_from_a_checkpoint_cut_short_is_refused_or_passed_over(tmp_path, bad):
    from transformers import TrainingArguments

    from hf_gradprune import PruningArguments, PruningTrainer

    from .helpers import build_tiny, tiny_dataset

    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    save_pruned(build_tiny("bert"), out / "checkpoint-4")  # a model, but no trainer_state.json
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=TrainingArguments(str(out), max_steps=2, use_cpu=True, report_to=[], disable_tqdm=True),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(weight_sparsity=0.5),
    )
    target = True if bad == "resume_from_checkpoint" else str(out / "checkpoint-4")
    message = (
        r"No valid checkpoint found in output directory \(.*out\) \(1 cut short, skipped\)"
        if target is True
        else "has no trainer_state.json.*cut short"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=target)


@pytest.mark.parametrize("target", ["missing", True])
def test_resume_from_nothing_says_what_is_missing_as_the_trainer_does(tmp_path, target):
    from transformers import TrainingArguments

    from hf_gradprune import PruningArguments, PruningTrainer

    from .helpers import build_tiny, tiny_dataset

    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=TrainingArguments(str(tmp_path / "out"), max_steps=2, use_cpu=True, report_to=[]),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(weight_sparsity=0.5),
    )
    if target is True:
        message = r"^No valid checkpoint found in output directory \(.*out\)\.$"
    else:
        target = str(tmp_path / "out" / "checkpoint-9")
        message = r"^Can't find a valid checkpoint at .*checkpoint-9: there is no such folder"
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=target)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- damaged and foreign files: a clear error at load, never a re-initialised or unmasked model -------------


def pruned_masked_folder(tmp_path: Path) -> tuple[Path, BertForSequenceClassification]:
    from hf_gradprune import prune_heads
    from hf_gradprune.core.masks import apply_masks

    model = small_bert(0)
    prune_heads(model, {0: [1], 1: [0, 2]})
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    apply_masks(model, {name: torch.rand(37, 32, generator=torch.Generator().manual_seed(0)) > 0.5})
    folder = save_pruned(model, tmp_path / "pruned")
    return folder, model


def edit_record(folder: Path, **changes) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    config["hf_gradprune"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_saved_folder_reloads_with_its_masks(tmp_path):
    folder, model = pruned_masked_folder(tmp_path)
    assert PruningRecord.from_config(model.config).weight_masks == 1
    loaded = load_pruned(folder)
    assert get_masks(loaded).keys() == get_masks(model).keys()


def test_load_of_a_record_that_disagrees_with_the_weights_is_an_error(tmp_path):
    folder, _ = pruned_masked_folder(tmp_path)
    edit_record(folder, pruned_heads={"0": [1, 3]})
    with pytest.raises(ValueError, match=r"does not match its pruning record.*query.weight: checkpoint"):
        load_pruned(folder)


def test_load_of_a_truncated_weights_file_is_an_error(tmp_path):
    folder, _ = pruned_masked_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors in 'pruned' is damaged or truncated"):
        load_pruned(folder)


def test_load_without_the_masks_file_has_them_back_exactly_from_the_zeros(tmp_path):
    folder, model = pruned_masked_folder(tmp_path)
    (folder / "pruning_masks.safetensors").unlink()
    masks, again = get_masks(model), get_masks(load_pruned(folder))
    assert masks.keys() == again.keys() and all(torch.equal(masks[k], again[k]) for k in masks)


def test_load_without_the_masks_file_and_other_zeros_is_an_error_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = pruned_masked_folder(tmp_path)
    (folder / "pruning_masks.safetensors").unlink()
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    weights = load_file(folder / "model.safetensors")
    kept = (weights[name] != 0).nonzero()[0]
    weights[name][tuple(kept)] = 0.0  # a kept weight that is exactly zero: the zeros say one more
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=rf"{name}' has \d+ zeros where \d+ entries were masked.*save_pruned"
    ):
        load_pruned(folder)


def test_load_without_the_masks_file_of_a_record_without_counts_is_an_error(tmp_path):
    import json

    folder, _ = pruned_masked_folder(tmp_path)
    (folder / "pruning_masks.safetensors").unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["hf_gradprune"]["masked_entries"]  # as hf_gradprune 0.2 wrote it
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        FileNotFoundError, match=r"says 1 weight tensors are masked.*apply_weight_masks=False"
    ):
        load_pruned(folder)
    assert not get_masks(load_pruned(folder, apply_weight_masks=False))  # the stated way out


def test_load_of_masks_from_another_save_is_an_error(tmp_path):
    from hf_gradprune.core.mask_files import save_masks

    folder, _ = pruned_masked_folder(tmp_path)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    save_masks({name: torch.ones(32, 37, dtype=torch.bool)}, folder / "pruning_masks.safetensors")
    with pytest.raises(ValueError, match=r"The mask of 'bert.encoder.*' has shape \(32, 37\)"):
        load_pruned(folder)
    edit_record(folder, weight_masks=2)
    with pytest.raises(ValueError, match=r"holds 1 masks, config.json says 2"):
        load_pruned(folder)


def test_load_of_a_record_from_a_newer_hf_gradprune_is_an_error(tmp_path):
    folder, _ = pruned_masked_folder(tmp_path)
    edit_record(folder, format=2, version="9.0.0")
    with pytest.raises(ValueError, match=r"written by hf_gradprune 9.0.0 \(record format 2\).*upgrade"):
        load_pruned(folder)


def test_load_with_a_model_class_of_another_family_is_an_error(tmp_path):
    from transformers import GPT2LMHeadModel

    folder, _ = pruned_masked_folder(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'bert' model .*GPT2LMHeadModel builds 'gpt2' models"):
        load_pruned(folder, model_class=GPT2LMHeadModel)


class _Payload:
    """A pickle that creates ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_load_of_pickled_weights_needs_opt_in_and_never_runs_their_code(tmp_path):
    folder, model = pruned_masked_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"has only pytorch_model.bin, a pickle.*allow_pickle=True"):
        load_pruned(folder)
    loaded = load_pruned(folder, allow_pickle=True)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    torch.save({"weight": _Payload(tmp_path / "pwned")}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_pruned(folder, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_a_save_without_masks_removes_an_earlier_saves_masks_file(tmp_path):
    from hf_gradprune.core.masks import remove_masks

    folder, model = pruned_masked_folder(tmp_path)
    assert (folder / "pruning_masks.safetensors").is_file()
    remove_masks(model)
    save_pruned(model, folder)
    assert not (folder / "pruning_masks.safetensors").exists()
    assert not get_masks(load_pruned(folder))
