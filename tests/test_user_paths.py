"""What users hit first with the trainer, the card and load_pruned, written the way they call it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_gradprune import GradientPruningCallback, PruningArguments, PruningTrainer, load_pruned, prune_units
from hf_gradprune.testing import LocalHub

from .helpers import build_tiny, logits, run_fresh, tiny_batch, tiny_dataset


def args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    return TrainingArguments(**{**defaults, **overrides})


@pytest.mark.parametrize(
    ("model_type", "auto"), [("bert", AutoModelForSequenceClassification), ("llama", AutoModelForCausalLM)]
)
def test_load_pruned_accepts_auto_classes(model_type, auto, tmp_path):
    model = build_tiny(model_type)
    prune_units(model, {"heads": {1: [0, 1]}, "ffn": {0: [3, 5]}})
    model.save_pretrained(tmp_path)
    again = load_pruned(tmp_path, model_class=auto)
    assert type(again) is type(model)
    batch = tiny_batch(model)
    assert torch.equal(logits(again, batch), logits(model, batch))


def test_load_pruned_accepts_a_concrete_class(tmp_path):
    model = build_tiny("bert")
    prune_units(model, {"heads": {1: [0]}})
    model.save_pretrained(tmp_path)
    assert (
        type(load_pruned(tmp_path, model_class=BertForSequenceClassification))
        is BertForSequenceClassification
    )


@pytest.mark.parametrize("bad", ["BertForSequenceClassification", torch.nn.Linear, 3])
def test_load_pruned_other_model_class_is_a_type_error(bad, tmp_path):
    model = build_tiny("bert")
    model.save_pretrained(tmp_path)
    with pytest.raises(
        TypeError, match=r"`model_class` must be a transformers Auto class .* or a PreTrainedModel"
    ):
        load_pruned(tmp_path, model_class=bad)


PUSH_WITH_CARD_ARGS = """
import json, sys
from transformers import TrainingArguments
from huggingface_hub import ModelCard
from hf_gradprune import PruningArguments, PruningTrainer
from tests.helpers import build_tiny, tiny_dataset
out, repo = sys.argv[1], sys.argv[2]
model = build_tiny(sys.argv[3])
args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=8, report_to=[], save_strategy="no",
                         use_cpu=True, disable_tqdm=True, hub_model_id=repo)
causal = sys.argv[3] == "llama"
trainer = PruningTrainer(model=model, args=args, train_dataset=tiny_dataset(causal=causal),
                         pruning_args=PruningArguments(prune_heads_per_layer=1, importance_batches=1))
trainer.train()
trainer.push_to_hub(finetuned_from="org/base-model", dataset_tags="org/data", model_name="renamed")
card = ModelCard.load(repo)
print(json.dumps(card.data.to_dict()))
"""


@pytest.mark.parametrize(
    ("model_type", "task"), [("bert", "text-classification"), ("llama", "text-generation")]
)
def test_trainer_push_to_hub_takes_card_arguments_and_the_task_of_the_model(model_type, task, tmp_path):
    with LocalHub(tmp_path / "hub", token="secret") as hub:
        env = hub.client_env(tmp_path / "home", "secret")
        env["PYTHONPATH"] = str(__import__("pathlib").Path(__file__).resolve().parents[1])
        out = run_fresh(PUSH_WITH_CARD_ARGS, str(tmp_path / "run"), "test-user/pushed", model_type, env=env)
    metadata = json.loads(out.splitlines()[-1])
    assert metadata["base_model"] == "org/base-model"
    assert metadata["datasets"] == ["org/data"]
    assert metadata["pipeline_tag"] == task
    assert task in metadata["tags"] and {"text-classification", "text-generation"} - {task} - set(
        metadata["tags"]
    )


def test_trainer_save_model_writes_the_card_with_the_fields_given_to_create_model_card(tmp_path):
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(prune_heads_per_layer=1, importance_batches=1),
    )
    trainer.train()
    trainer.create_model_card(finetuned_from="org/base-model", tasks="token-classification")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/base-model" in text and "pipeline_tag: token-classification" in text
    trainer.save_model(str(tmp_path / "card"))
    assert "base_model: org/base-model" in (tmp_path / "card" / "README.md").read_text()


def test_card_of_a_model_with_no_known_task_has_no_pipeline_tag(tmp_path):
    from hf_gradprune import create_pruning_model_card

    model = build_tiny("bert").bert  # a bare encoder: no task head
    card = create_pruning_model_card(model)
    assert card.data.pipeline_tag is None and "text-classification" not in (card.data.tags or [])


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_progress_bars_follow_disable_tqdm(disable_tqdm, tmp_path, capfd):
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path, disable_tqdm=disable_tqdm),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(
            prune_heads_per_layer=1, weight_sparsity=0.5, prune_steps="0,2", importance_batches=1
        ),
    )
    trainer.train()
    err = capfd.readouterr().err
    shown = ["Unit importance" in err, "Weight importance" in err]
    assert shown == ([False, False] if disable_tqdm else [True, True])


class Recorder(TrainerCallback):
    """Stands for a ``report_to`` integration: records every ``logs`` it is handed."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_pruning_metrics_reach_integrations_that_run_before_the_pruning_callback(tmp_path):
    recorder = Recorder()
    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(weight_sparsity=0.5, importance_batches=1),
    )
    trainer.callback_handler.callbacks.insert(0, recorder)  # where report_to integrations sit
    trainer.train()
    (logged,) = [entry for entry in recorder.logs if "prune/sparsity" in entry]
    assert logged["prune/sparsity"] == 0.5 and "loss" in logged
    assert next(e for e in trainer.state.log_history if "prune/sparsity" in e)["prune/sparsity"] == 0.5


def test_plain_trainer_logs_pruning_metrics_through_its_logging(tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path),
        train_dataset=tiny_dataset(),
        callbacks=[
            GradientPruningCallback(PruningArguments(weight_sparsity=0.5, importance_batches=1)),
            recorder,
        ],
    )
    trainer.train()
    assert [e["prune/sparsity"] for e in recorder.logs if "prune/sparsity" in e] == [0.5]
    assert [e["step"] for e in trainer.state.log_history if "prune/sparsity" in e] == [1]


def test_tensorboard_integration_records_pruning_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = PruningTrainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path, report_to=["tensorboard"]),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(prune_ffn_fraction=0.25, weight_sparsity=0.5, importance_batches=1),
    )
    trainer.train()
    runs = tmp_path / "out" / "runs"
    (logged,) = [folder for folder in runs.iterdir() if folder.name != "pruning"]
    scalars = EventAccumulator(str(logged)).Reload()
    assert scalars.Scalars("train/prune/sparsity")[0].value == pytest.approx(0.5)
    assert scalars.Scalars("train/prune/ffn_layer_0")[0].value == 28
    images = EventAccumulator(str(runs / "pruning"), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert "prune/ffn_sizes" in images


def resumable(tmp_path, **changes) -> PruningTrainer:
    pruning = {
        "weight_sparsity": 0.5,
        "sparsity_schedule": "linear",
        "sparsity_schedule_end": 4,
        "sparsity_schedule_frequency": 2,
        "importance_batches": 1,
    }
    return PruningTrainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=tiny_dataset(),
        pruning_args=PruningArguments(**{**pruning, **changes}),
    )


def test_resume_with_arguments_that_change_what_is_pruned_is_a_clear_error(tmp_path):
    resumable(tmp_path).train()
    with pytest.raises(ValueError, match=r"`--weight_sparsity` 0.5 -> 0.8.*change what is pruned"):
        resumable(tmp_path, weight_sparsity=0.8).train(
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
        )


@pytest.mark.parametrize(
    ("flag", "before", "after"), [("importance_batches", 1, 2), ("scoring_passes", 1, 2)]
)
def test_resume_with_a_harmless_change_warns(tmp_path, flag, before, after):
    resumable(tmp_path).train()
    with pytest.warns(UserWarning, match=rf"changed pruning arguments: `--{flag}` {before} -> {after}"):
        resumable(tmp_path, **{flag: after}).train(
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
        )


def test_plain_trainer_resume_with_changed_arguments_is_a_clear_error(tmp_path):
    resumable(tmp_path).train()
    callback = GradientPruningCallback(PruningArguments(weight_sparsity=0.6, importance_batches=1))
    trainer = Trainer(
        model=build_tiny("bert").train(),
        args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=tiny_dataset(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match=r"`--sparsity_schedule` 'linear' -> 'one_shot'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
