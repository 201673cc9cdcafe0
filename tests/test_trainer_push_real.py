"""PruningTrainer.push_to_hub on the real MiniLM, against the local Hub-protocol server, read back fresh."""

import json

import pytest

from hf_gradprune.testing import LocalHub

from .helpers import run_fresh

pytestmark = [pytest.mark.real, pytest.mark.slow]

TOKEN = "hf_test_token_for_local_hub"
REPO = "test-user/minilm-pruned"

TRAIN_AND_PUSH = """
import json, sys, torch
from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding,
                          TrainingArguments)
from hf_gradprune import PruningArguments, PruningTrainer
from hf_gradprune.testing import load_rotten_tomatoes, minilm_path

out, repo = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
data = load_rotten_tomatoes()
data = data.map(lambda r: tokenizer(r["text"], truncation=True, max_length=48), batched=True,
                remove_columns=["text"])
args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=32,
                         report_to=[], save_strategy="no", use_cpu=True, hub_model_id=repo, disable_tqdm=True)
trainer = PruningTrainer(model=model, args=args, train_dataset=data["train"].select(range(32)),
                         eval_dataset=data["test"].select(range(32)), processing_class=tokenizer,
                         data_collator=DataCollatorWithPadding(tokenizer), dataset_name="rotten_tomatoes",
                         pruning_args=PruningArguments(prune_heads_per_layer=1, weight_sparsity=0.3,
                                                       importance_batches=2))
trainer.evaluate()
trainer.train()
after = trainer.evaluate()
first = trainer.push_to_hub(commit_message="first")
batch = tokenizer(["a gripping, beautifully acted film", "dull and lifeless"], padding=True,
                  return_tensors="pt")
with torch.no_grad():
    first_logits = trainer.model(**batch).logits
    trainer.model.classifier.weight.add_(0.5)
    second_logits = trainer.model(**batch).logits
second = trainer.push_to_hub(commit_message="second")
torch.save({"batch": dict(batch), "first": first_logits, "second": second_logits}, out + "/expected.pt")
print(json.dumps({"first": first.oid, "second": second.oid, "eval_loss": after["eval_loss"],
                  "params": trainer.model.num_parameters()}))
"""

LOAD_BACK = """
import json, sys, torch
from pathlib import Path
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from hf_gradprune import load_pruned
repo, expected_path, first = sys.argv[1], sys.argv[2], sys.argv[3]
expected = torch.load(expected_path)
with torch.no_grad():
    latest = load_pruned(repo)(**expected["batch"]).logits
    old = load_pruned(repo, revision=first)(**expected["batch"]).logits
card = ModelCard.load(repo)
texts = [Path(hf_hub_download(repo, name)).read_text() for name in ("config.json", "training_args.json")]
commits = [c.title for c in HfApi().list_repo_commits(repo)]
files = sorted(HfApi().list_repo_files(repo))
print(json.dumps({
    "latest_equal": bool(torch.equal(latest, expected["second"])),
    "first_equal": bool(torch.equal(old, expected["first"])),
    "commits": commits, "files": files, "card": card.text, "texts": texts,
    "metadata": card.data.to_dict(),
}))
"""


def test_trainer_push_to_hub_then_fresh_load_pruned_by_repo_id_and_revision(tmp_path):
    with LocalHub(tmp_path / "hub", token=TOKEN) as hub:
        env = hub.client_env(tmp_path / "home", TOKEN)
        pushed = json.loads(run_fresh(TRAIN_AND_PUSH, str(tmp_path / "run"), REPO, env=env).splitlines()[-1])
        back = json.loads(
            run_fresh(
                LOAD_BACK,
                REPO,
                str(tmp_path / "run" / "expected.pt"),
                pushed["first"],
                env=hub.client_env(tmp_path / "home2"),
            ).splitlines()[-1]
        )
    assert back["latest_equal"] and back["first_equal"]
    assert back["commits"][:2] == ["second", "first"]
    assert {
        "config.json",
        "model.safetensors",
        "pruning_masks.safetensors",
        "README.md",
        "head_importance.png",
        "tokenizer.json",
    } <= set(back["files"])
    assert not [f for f in back["files"] if f.endswith((".bin", ".pt", ".pth"))]
    metadata = back["metadata"]
    assert {"pruning", "hf-gradprune"} <= set(metadata["tags"]) and metadata["library_name"] == "transformers"
    assert metadata["datasets"] == ["rotten_tomatoes"]
    assert f"{pushed['params']:,}" in back["card"]
    assert f'load_pruned("{REPO}")' in back["card"]
    for text in [back["card"], *back["texts"]]:
        assert str(tmp_path) not in text and TOKEN not in text


PUSH_WITHOUT_TOKEN = """
import sys
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from hf_gradprune import PruningArguments, PruningTrainer
model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=37, vocab_size=99))
args = TrainingArguments(sys.argv[1], report_to=[], use_cpu=True, hub_model_id=sys.argv[2])
trainer = PruningTrainer(model=model, args=args, pruning_args=PruningArguments(prune_heads_per_layer=1))
try:
    trainer.push_to_hub()
except ValueError as error:
    print(error)
"""

REPO_EXISTS = """
import sys
from huggingface_hub import HfApi
print(HfApi().repo_exists(sys.argv[1]))
"""


def test_trainer_push_without_token_is_a_clear_error_and_leaves_nothing(tmp_path):
    with LocalHub(tmp_path / "hub", token=TOKEN) as hub:
        env = hub.client_env(tmp_path / "home")
        message = run_fresh(PUSH_WITHOUT_TOKEN, str(tmp_path / "run"), REPO, env=env)
        exists = run_fresh(REPO_EXISTS, REPO, env=env).strip()
    assert "No Hugging Face token" in message and "HF_TOKEN" in message
    assert exists == "False"
    assert not list((tmp_path / "hub").rglob("*.safetensors"))
