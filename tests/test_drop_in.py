"""PruningTrainer and GradientPruningCallback as drop-ins: any model resumes, a callback run's save reloads, a
resumed run writes the card of an uninterrupted one, and the Trainer's own messages."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningTrainer, load_pruned, save_pruned
from hf_gradprune.core.masks import get_masks

from .helpers import RAMP_PRUNING, build_tiny, quiet_cpu_args, run_fresh, tiny_batch, tiny_dataset
from .resume_worker import PlainModel

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(out_dir: Path, kind: str, mode: str, trainer: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(out_dir), kind, mode, trainer],
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_same_model(expected: torch.nn.Module, again: torch.nn.Module) -> None:
    masks, again_masks = get_masks(expected), get_masks(again)
    assert masks and masks.keys() == again_masks.keys()
    assert all(torch.equal(masks[k], again_masks[k]) for k in masks)
    state, again_state = expected.state_dict(), again.state_dict()
    assert state.keys() == again_state.keys()
    for key, value in state.items():
        torch.testing.assert_close(again_state[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kind", "trainer"),
    [("resnet", "pruning"), ("vit", "pruning"), ("plain", "pruning"), ("resnet", "callback")],
)
def test_weight_pruned_model_of_no_family_resumes_after_sigkill_as_if_uninterrupted(tmp_path, kind, trainer):
    full = run_worker(tmp_path / "full", kind, "full", trainer)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = run_worker(tmp_path / "killed", kind, "killed", trainer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (tmp_path / "killed" / "out" / "checkpoint-8" / "trainer_state.json").exists()
    model_class = PlainModel if kind == "plain" else None  # a config of no model_type needs the class
    expected = load_pruned(tmp_path / "full" / "final", model_class=model_class)
    modes = ["resume"] if trainer == "callback" else ["resume", "resume_path"]
    for mode in modes:
        shutil.copytree(tmp_path / "killed", tmp_path / mode)
        if trainer == "callback":  # a plain Trainer would take the cut-short checkpoint: its user removes it
            shutil.rmtree(tmp_path / mode / "out" / "checkpoint-8")
        resumed = run_worker(tmp_path / mode, kind, mode, trainer)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert_same_model(expected, load_pruned(tmp_path / mode / "final", model_class=model_class))


RELOAD = """
import sys, torch
from hf_gradprune import load_pruned
from hf_gradprune.core.masks import get_masks
model = load_pruned(sys.argv[1])
with torch.no_grad():
    logits = model(**torch.load(sys.argv[2])).logits
torch.save({"logits": logits, "masks": get_masks(model), "state": model.state_dict()}, sys.argv[3])
"""


def test_callback_runs_save_model_folder_reloads_in_a_fresh_process_with_its_masks(tmp_path):
    model = build_tiny("llama").train()
    callback = GradientPruningCallback(
        PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.5, importance_batches=2)
    )
    trainer = Trainer(
        model=model,
        args=quiet_cpu_args(tmp_path / "out", max_steps=3),
        train_dataset=tiny_dataset(causal=True),
        callbacks=[callback],
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))  # a plain Trainer: weights and config, no masks file
    assert not (tmp_path / "saved" / "pruning_masks.safetensors").exists()
    batch = {k: v for k, v in tiny_batch(model).items() if k != "labels"}
    torch.save(batch, tmp_path / "batch.pt")
    run_fresh(RELOAD, str(tmp_path / "saved"), str(tmp_path / "batch.pt"), str(tmp_path / "again.pt"))
    again = torch.load(tmp_path / "again.pt")
    masks = get_masks(model)
    assert masks and masks.keys() == again["masks"].keys()
    assert all(torch.equal(masks[k].cpu(), again["masks"][k]) for k in masks)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again["logits"], model(**batch).logits, atol=0, rtol=0)
    assert all(torch.equal(value, again["state"][key]) for key, value in model.state_dict().items())


def callback_trainer(output_dir: Path, model: torch.nn.Module) -> Trainer:
    args = quiet_cpu_args(output_dir, max_steps=12, save_strategy="steps", save_steps=4, seed=0, data_seed=0)
    callback = GradientPruningCallback(PruningArguments(**RAMP_PRUNING))
    return Trainer(model=model, args=args, train_dataset=tiny_dataset(rows=96), callbacks=[callback])


def test_callback_resumes_a_structural_cut_from_a_checkpoint_of_output_dir(tmp_path):
    full = callback_trainer(tmp_path / "full", build_tiny("bert").train())
    full.train()
    shutil.copytree(
        tmp_path / "full", tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-8", "checkpoint-12")
    )
    again = callback_trainer(tmp_path / "run", build_tiny("bert").train())
    again.train(
        resume_from_checkpoint=True
    )  # checkpoint-8, after the step-6 cut: its shapes are replayed first
    assert_same_model(full.model, again.model)


def test_callback_resume_from_a_cut_checkpoint_elsewhere_says_what_to_call_and_that_works(tmp_path):
    full = callback_trainer(tmp_path / "full", build_tiny("bert").train())
    full.train()
    checkpoint = tmp_path / "kept" / "checkpoint-8"  # after the step-6 cut
    shutil.copytree(tmp_path / "full" / "checkpoint-8", checkpoint)
    model = build_tiny("bert").train()
    again = callback_trainer(tmp_path / "run", model)
    with pytest.raises(ValueError, match=r"Call `callback.resume_from\(checkpoint, model\)`.*before"):
        again.train(resume_from_checkpoint=str(checkpoint))
    again = callback_trainer(tmp_path / "run", build_tiny("bert").train())
    callback = next(c for c in again.callback_handler.callbacks if isinstance(c, GradientPruningCallback))
    callback.resume_from(checkpoint, again.model)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert_same_model(full.model, again.model)


def test_pruning_trainer_resumes_a_checkpoint_of_a_plain_trainer(tmp_path):
    pruning = PruningArguments(weight_sparsity=0.5, prune_steps="6", importance_batches=2)

    def args(folder: str):
        return quiet_cpu_args(tmp_path / folder, max_steps=12, save_strategy="steps", save_steps=4, seed=0)

    plain = Trainer(model=build_tiny("bert").train(), args=args("plain"), train_dataset=tiny_dataset(rows=96))
    plain.train()
    checkpoint = tmp_path / "plain" / "checkpoint-4"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in checkpoint.iterdir()}
    full = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args("full"),
        train_dataset=tiny_dataset(rows=96),
        pruning_args=pruning,
    )
    full.train()
    switched = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args("run"),
        train_dataset=tiny_dataset(rows=96),
        pruning_args=pruning,
    )
    switched.train(resume_from_checkpoint=str(checkpoint))  # its pickles read with weights_only=True
    assert_same_model(full.model, switched.model)


def card_run(output_dir: Path, resume: bool = False) -> PruningTrainer:
    args = quiet_cpu_args(
        output_dir, max_steps=8, save_strategy="steps", save_steps=4, seed=0, eval_strategy="no"
    )
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args,
        train_dataset=tiny_dataset(rows=96),
        eval_dataset=tiny_dataset(rows=16, seed=1),
        pruning_args=PruningArguments(prune_heads_per_layer=1, prune_steps="2", importance_batches=2),
    )
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.evaluate()
    trainer.save_model()
    return trainer


def test_resumed_run_writes_the_card_and_heatmap_of_an_uninterrupted_run(tmp_path):
    card_run(tmp_path / "full" / "out")
    shutil.copytree(tmp_path / "full" / "out" / "checkpoint-4", tmp_path / "run" / "out" / "checkpoint-4")
    resumed = card_run(tmp_path / "run" / "out", resume=True)
    assert resumed.eval_before and resumed.eval_pruned and resumed.eval_after  # three columns by default
    card = (tmp_path / "full" / "out" / "README.md").read_text()
    assert "head_importance.png" in card
    assert (tmp_path / "run" / "out" / "README.md").read_text() == card
    heatmap = (tmp_path / "full" / "out" / "head_importance.png").read_bytes()
    assert (tmp_path / "run" / "out" / "head_importance.png").read_bytes() == heatmap


def test_unknown_keyword_fails_as_the_trainers_does(tmp_path):
    with pytest.raises(
        TypeError, match=r"^Trainer.__init__\(\) got an unexpected keyword argument 'tokenizer'"
    ):
        PruningTrainer(
            model=build_tiny("bert"),
            args=quiet_cpu_args(tmp_path),
            tokenizer=None,
            pruning_args=PruningArguments(weight_sparsity=0.5),
        )


def test_weights_only_checkpoint_of_no_family_reloads(tmp_path):
    from .resume_worker import build

    model = build("vit")
    from hf_gradprune.core.masks import apply_masks

    name = "classifier.weight"
    apply_masks(model, {name: torch.rand(model.get_parameter(name).shape) > 0.5})
    save_pruned(model, tmp_path / "vit")
    assert_same_model(model, load_pruned(tmp_path / "vit"))


def test_rng_state_is_the_trainers_own_without_pickle_and_restores_every_generator(tmp_path):
    import random

    import numpy as np
    from transformers.trainer_pt_utils import safe_globals

    from hf_gradprune.training.state import load_state

    trainer = PruningTrainer(
        model=build_tiny("bert"),
        args=quiet_cpu_args(tmp_path / "out"),
        pruning_args=PruningArguments(weight_sparsity=0.5),
    )
    plain = Trainer(model=build_tiny("bert"), args=quiet_cpu_args(tmp_path / "plain"))
    torch.manual_seed(3)
    trainer._save_rng_state(str(tmp_path / "ours"))
    torch.manual_seed(3)
    plain._save_rng_state(str(tmp_path / "theirs"))
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {"rng_state.json", "rng_state.safetensors"}
    ours = load_state(tmp_path / "ours", "rng_state")
    with safe_globals():
        theirs = torch.load(tmp_path / "theirs" / "rng_state.pth", weights_only=True)
    assert ours.keys() == theirs.keys()  # every generator the Trainer saves on this machine
    assert torch.equal(ours["cpu"], theirs["cpu"])
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    trainer._load_rng_state(str(tmp_path / "ours"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_weight_pruned_model_of_no_family_writes_its_card_and_a_vanilla_export(tmp_path):
    from transformers import TrainingArguments, ViTForImageClassification

    from .resume_worker import build, data

    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = PruningTrainer(
        model=build("vit").train(),
        args=args,
        train_dataset=data("vit"),
        eval_dataset=data("vit", 16),
        pruning_args=PruningArguments(
            weight_sparsity=0.5, weight_importance="magnitude", export_vanilla=True
        ),
    )
    trainer.train()
    trainer.save_model()
    assert "- pruning\n" in (tmp_path / "out" / "README.md").read_text()
    again = ViTForImageClassification.from_pretrained(tmp_path / "out")  # plain transformers
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trainer.model.state_dict().items())


def test_callback_resumed_from_a_checkpoint_elsewhere_without_its_state_says_what_to_call(tmp_path):
    def trainer(folder: str) -> Trainer:
        args = quiet_cpu_args(tmp_path / folder, max_steps=4, save_strategy="steps", save_steps=2)
        callback = GradientPruningCallback(
            PruningArguments(weight_sparsity=0.5, weight_importance="magnitude")
        )
        return Trainer(
            model=build_tiny("bert").train(), args=args, train_dataset=tiny_dataset(), callbacks=[callback]
        )

    trainer("full").train()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "kept" / "checkpoint-2")
    with pytest.warns(
        UserWarning, match=r"holds no pruning state.*`callback.resume_from\(checkpoint, model\)`"
    ):
        trainer("run").train(resume_from_checkpoint=str(tmp_path / "kept" / "checkpoint-2"))
