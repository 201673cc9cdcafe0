"""PruningTrainer keeps the Trainer's public surface: signatures, model cards, hub strategies, evaluation
prefixes, and a clear refusal where pruning and the Trainer's feature cannot go together."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments

from hf_gradprune import PruningArguments, PruningTrainer
from hf_gradprune.testing import LocalHub

from .helpers import build_tiny, quiet_cpu_args, run_fresh, tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def trainer_for(tmp_path: Path, prune_steps: str = "0", **overrides) -> PruningTrainer:
    return PruningTrainer(
        model=build_tiny("bert").train(),
        args=quiet_cpu_args(tmp_path / "out", **overrides),
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(),
        compute_metrics=accuracy,
        pruning_args=PruningArguments(prune_heads_per_layer=1, importance_batches=1, prune_steps=prune_steps),
    )


@pytest.mark.parametrize("method", ["push_to_hub", "create_model_card", "save_model", "evaluate"])
def test_methods_keep_the_trainer_parameters_in_the_trainer_order(method):
    def named(cls: type) -> list[tuple]:
        parameters = [
            (n, p.kind, p.default) for n, p in inspect.signature(getattr(cls, method)).parameters.items()
        ]
        # A trailing **kwargs passes a host's own arguments through (Seq2SeqTrainer's generation arguments).
        return parameters[:-1] if parameters[-1][1] is inspect.Parameter.VAR_KEYWORD else parameters

    assert named(PruningTrainer) == named(Trainer)


def test_create_model_card_writes_the_pruning_card_with_the_trainer_fields(tmp_path):
    trainer = trainer_for(tmp_path, eval_strategy="steps", eval_steps=1)
    trainer.train()
    trainer.create_model_card(
        language="en",
        license="apache-2.0",
        tags=["my-tag"],
        finetuned_from="org/base",
        tasks="text-classification",
        dataset_tags="glue",
        dataset="GLUE SST2",
        dataset_args="sst2",
    )
    card = ModelCard.load(tmp_path / "out" / "README.md")
    data = card.data
    assert (data.base_model, data.license, data.language, data.pipeline_tag) == (
        "org/base",
        "apache-2.0",
        ["en"],
        "text-classification",
    )
    assert {"pruning", "hf-gradprune", "my-tag"} <= set(data.tags) and data.datasets == ["glue"]
    result = data.eval_results[0]
    assert (result.dataset_type, result.dataset_name, result.dataset_config) == ("glue", "GLUE SST2", "sst2")
    assert "Attention heads removed:** 3 of 12" in card.text and "# out\n" in card.text
    assert "- training_steps: 2" in card.text and "| Validation Loss |" in card.text
    assert "prune/" not in card.text.split("### Training results")[1]
    # The arguments the run set, the rest in one line.
    table = card.text.split("| Argument | Value |")[1].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert listed == ["prune_heads_per_layer", "importance_batches"]  # prune_steps="0" is the default
    rest = len(PruningArguments.defaults()) - len(listed)
    assert f"The {rest} other pruning arguments were left at their defaults." in card.text


def test_create_model_card_names_a_local_base_model_without_its_path(tmp_path):
    trainer = trainer_for(tmp_path)
    trainer.train()
    trainer.create_model_card(finetuned_from=str(tmp_path / "my-base"), dataset=str(tmp_path / "data"))
    text = (tmp_path / "out" / "README.md").read_text()
    assert "pruned from a local checkpoint" in text and "a local dataset" in text
    assert str(tmp_path) not in text and "base_model" not in text


def test_create_model_card_fields_stay_for_the_card_of_the_next_save(tmp_path):
    trainer = trainer_for(tmp_path)
    trainer.train()
    trainer.create_model_card(finetuned_from="org/base")
    trainer.save_model(str(tmp_path / "again"))
    assert ModelCard.load(tmp_path / "again" / "README.md").data.base_model == "org/base"


def test_push_to_hub_with_an_unknown_card_argument_fails_before_saving_anything(tmp_path):
    trainer = trainer_for(tmp_path)
    with pytest.raises(TypeError, match=r"\['base_model'\].*finetuned_from"):
        trainer.push_to_hub(base_model="org/base")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_card_field_of_the_wrong_type_is_a_type_error_naming_it(tmp_path):
    trainer = trainer_for(tmp_path)
    with pytest.raises(TypeError, match=r"`dataset_args` must be a str or a list of str, got 3"):
        trainer.create_model_card(dataset_args=3)


def test_evaluate_with_another_prefix_is_not_the_card_evaluation(tmp_path):
    trainer = trainer_for(tmp_path)
    trainer.train()
    final = trainer.evaluate()
    test = trainer.evaluate(metric_key_prefix="test")
    assert "test_accuracy" in test and trainer.eval_after == final
    assert trainer.predict(tiny_dataset(), metric_key_prefix="predict").metrics.keys() >= {"predict_accuracy"}


def test_evaluate_right_after_a_cut_returns_its_own_metrics_while_the_log_has_the_pruning(tmp_path):
    trainer = trainer_for(tmp_path, prune_steps="1")
    trainer.train()
    assert trainer.eval_pruned is not None and not any(k.startswith("prune/") for k in trainer.eval_pruned)
    before, logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert not any(k.startswith("prune/") for k in before)  # evaluated before the cut, then right after
    assert logged["prune/heads_layer_0"] == 3
    assert trainer.eval_before["eval_loss"] == before["eval_loss"]


def test_model_init_and_hyperparameter_search_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"does not take `model_init`.*Pass the model itself as `model=`"):
        PruningTrainer(
            model_init=lambda: build_tiny("bert"),
            args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
            pruning_args=PruningArguments(prune_heads_per_layer=1),
        )
    with pytest.raises(ValueError, match=r"does not run `hyperparameter_search`.*plain `Trainer`"):
        trainer_for(tmp_path).hyperparameter_search()


HUB_STRATEGY = """
import json, sys
from transformers import TrainingArguments
from hf_gradprune import PruningArguments, PruningTrainer
from tests.helpers import build_tiny, tiny_dataset
out, repo, strategy = sys.argv[1], sys.argv[2], sys.argv[3]
args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                         disable_tqdm=True, save_strategy="steps", save_steps=1, save_total_limit=1,
                         push_to_hub=True, hub_model_id=repo, hub_strategy=strategy, hub_always_push=True)
pruning = PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.5, prune_steps="0,2",
                           importance_batches=1)
trainer = PruningTrainer(model=build_tiny("bert").train(), args=args, train_dataset=tiny_dataset(),
                         pruning_args=pruning)
trainer.train()
future = trainer.push_to_hub("the end", False, finetuned_from="org/base")
print(json.dumps({"oid": future.result().oid}))
"""

LOAD_EVERY_COMMIT = """
import json, sys, torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from hf_gradprune import load_pruned
from hf_gradprune.core.masks import get_masks
repo = sys.argv[1]
api, snapshots = HfApi(), []
for commit in api.list_repo_commits(repo):
    files = api.list_repo_files(repo, revision=commit.commit_id)
    for folder in sorted({""} | {f.split("/")[0] for f in files if "/" in f}):
        model = load_pruned(repo, revision=commit.commit_id, subfolder=folder)
        masks = get_masks(model)
        zeros = all(bool((model.get_parameter(n)[~m] == 0).all()) for n, m in masks.items())
        heads = [layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer]
        readme = None if folder else hf_hub_download(repo, "README.md", revision=commit.commit_id)
        card = readme and ModelCard.load(readme)
        snapshots.append({"title": commit.title, "folder": folder, "heads": heads, "masked": bool(masks),
                          "zeros": zeros, "card_heads": card and f"{12 - sum(heads)} of 12" in card.text})
print(json.dumps(snapshots))
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_every_snapshot_pushed_by_a_hub_strategy_loads_with_its_masks_and_card(strategy, tmp_path):
    with LocalHub(tmp_path / "hub", token="secret") as hub:
        env = {**hub.client_env(tmp_path / "home", "secret"), "PYTHONPATH": str(ROOT)}
        run_fresh(HUB_STRATEGY, str(tmp_path / "run"), "test-user/m", strategy, env=env)
        snapshots = json.loads(run_fresh(LOAD_EVERY_COMMIT, "test-user/m", env=env).splitlines()[-1])
    titles = {s["title"] for s in snapshots}
    assert "the end" in titles and ("Training in progress, step 4" in titles) == (strategy != "end")
    assert all(s["masked"] and s["zeros"] for s in snapshots)
    assert all(s["card_heads"] for s in snapshots if not s["folder"])
    folders = {s["folder"] for s in snapshots} - {""}
    expected = {"end": set(), "every_save": set(), "checkpoint": {"last-checkpoint"}}
    assert folders == expected.get(strategy, {f"checkpoint-{step}" for step in range(1, 5)})
    cut = [s["heads"] for s in snapshots if s["title"] == "the end" and not s["folder"]]
    assert cut and all(heads == [3, 3, 3] for heads in cut)
