"""Pushing a pruned model folder to a Hub (a `LocalHub`) with the real `huggingface_hub` client.

The client reads `HF_ENDPOINT` when it is imported, so every push and download runs in a fresh interpreter
whose environment points at the local hub and holds nothing of the machine's Hugging Face setup.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from hf_gradprune import prune_heads
from hf_gradprune.io.cards import create_pruning_model_card
from hf_gradprune.io.figures import save_head_importance_heatmap
from hf_gradprune.testing import LocalHub

TOKEN = "secret"
USER = "test-user"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub", token=TOKEN, user=USER) as running_hub:
        yield running_hub


def run_client(
    hub: LocalHub, tmp_path: Path, script: str, *, hf_token: str | None = None, **args: Any
) -> Any:
    """Run ``script`` in a fresh interpreter against ``hub``; returns the JSON it printed last.

    The script sees ``args`` (a dict) and ``emit(value)``; ``HF_TOKEN`` is set only if ``hf_token`` is given.
    """
    env = hub.client_env(tmp_path / "hf_home", hf_token)
    prelude = (
        "import json, sys\nargs = json.loads(sys.argv[1])\nemit = lambda value: print(json.dumps(value))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99
    )
    return BertForSequenceClassification(config).eval()


def save_pruned_folder(folder: Path, model: BertForSequenceClassification, repo_id: str) -> None:
    """What a pruning run leaves behind: weights, tokenizer, heatmap, card, and files that must not ship."""
    before = tiny_bert().num_parameters()
    model.save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(94))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    scores = torch.rand(2, 4)
    scores[0, 1] = float("nan")
    save_head_importance_heatmap(scores, folder / "head_importance.png")
    card = create_pruning_model_card(
        model,
        base_model="google-bert/bert-base-uncased",
        params_before=before,
        eval_after={"eval_accuracy": 0.75},
        dataset_name="rotten_tomatoes",
        heatmap_filename="head_importance.png",
        repo_id=repo_id,
    )
    card.save(folder / "README.md")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"not shipped")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_bytes(b"not shipped")
    (folder / "training_args.bin").write_bytes(b"pickle, not shipped")


def pruned_folder(tmp_path: Path, name: str, repo_id: str, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """A saved pruned tiny BERT folder and its classifier weight."""
    model = tiny_bert(seed)
    prune_heads(model, {0: [1]})
    folder = tmp_path / name
    save_pruned_folder(folder, model, repo_id)
    return folder, model.classifier.weight.detach().clone()


PUSH_AND_DOWNLOAD = """
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
from hf_gradprune.io.hub import push_folder_to_hub

info = push_folder_to_hub(args["folder"], args["repo_id"], token=args["push_token"])
local = snapshot_download(args["repo_id"], revision=info.oid, local_dir=args["download"])
files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*")
               if p.is_file() and ".cache" not in p.parts)
emit({"oid": info.oid, "files": files, "commits": len(HfApi().list_repo_commits(args["repo_id"]))})
"""


def test_push_folder_to_hub_snapshot_download_gives_identical_files(hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{USER}/tiny-pruned"
    folder, _ = pruned_folder(tmp_path, "pruned", repo_id)
    download = tmp_path / "download"

    out = run_client(
        hub,
        tmp_path,
        PUSH_AND_DOWNLOAD,
        folder=str(folder),
        repo_id=repo_id,
        push_token=TOKEN,
        download=str(download),
    )

    shipped = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.parts[len(folder.parts)] not in ("checkpoint-10", "runs", "training_args.bin")
    )
    assert out["files"] == shipped
    assert {"config.json", "model.safetensors", "README.md", "head_importance.png", "tokenizer.json"} <= set(
        shipped
    )
    for name in shipped:
        assert (download / name).read_bytes() == (folder / name).read_bytes(), name
    assert out["commits"] == 1


PUSH_TWICE = """
from huggingface_hub import HfApi
from hf_gradprune.io.hub import push_folder_to_hub

first = push_folder_to_hub(args["first"], args["repo_id"])
second = push_folder_to_hub(args["second"], args["repo_id"], commit_message="Second pruning run")
commits = HfApi().list_repo_commits(args["repo_id"])
emit({"first": first.oid, "second": second.oid, "commits": [[c.commit_id, c.title] for c in commits]})
"""

LOAD_REVISIONS = """
from safetensors.torch import save_file
from hf_gradprune import load_pruned

first = load_pruned(args["repo_id"], revision=args["first"])
latest = load_pruned(args["repo_id"])
save_file({"first": first.classifier.weight.contiguous(), "latest": latest.classifier.weight.contiguous()},
          args["out"])
emit(first.bert.encoder.layer[0].attention.self.query.out_features)
"""


def test_push_folder_to_hub_twice_keeps_the_first_commit_loadable(hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{USER}/twice"
    first_folder, first_weight = pruned_folder(tmp_path, "first", repo_id, seed=0)
    second_folder, second_weight = pruned_folder(tmp_path, "second", repo_id, seed=1)
    assert not torch.equal(first_weight, second_weight)

    # The token comes from HF_TOKEN through huggingface_hub.get_token().
    pushed = run_client(
        hub,
        tmp_path,
        PUSH_TWICE,
        hf_token=TOKEN,
        first=str(first_folder),
        second=str(second_folder),
        repo_id=repo_id,
    )
    assert pushed["commits"] == [
        [pushed["second"], "Second pruning run"],
        [pushed["first"], "Upload pruned model with hf_gradprune"],
    ]

    out = tmp_path / "classifiers.safetensors"
    query_width = run_client(
        hub, tmp_path, LOAD_REVISIONS, repo_id=repo_id, first=pushed["first"], out=str(out)
    )
    assert query_width == 24
    loaded = load_file(out)
    torch.testing.assert_close(loaded["first"], first_weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded["latest"], second_weight, rtol=0, atol=0)


PUSH_WITHOUT_TOKEN = """
from huggingface_hub import get_token
from hf_gradprune.io.hub import push_folder_to_hub

assert get_token() is None
try:
    push_folder_to_hub(args["folder"], args["repo_id"])
except ValueError as error:
    emit(str(error))
"""


def test_push_folder_to_hub_without_a_token_raises_and_creates_nothing(hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{USER}/no-token"
    folder, _ = pruned_folder(tmp_path, "pruned", repo_id)

    message = run_client(hub, tmp_path, PUSH_WITHOUT_TOKEN, folder=str(folder), repo_id=repo_id)

    assert "No Hugging Face token" in message
    assert all(hint in message for hint in ("--hub_token", "HF_TOKEN", "hf auth login"))
    assert not (hub.root / "models" / USER / "no-token").exists()
    assert not any((hub.root / "models").glob("*/*"))


def test_push_folder_to_hub_rejects_a_folder_without_weights(tmp_path: Path) -> None:
    from hf_gradprune.io.hub import push_folder_to_hub

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(ValueError, match=r"has no \*\.safetensors weights to push .*\['config\.json'\]"):
        push_folder_to_hub(folder, f"{USER}/never", token=TOKEN)


PUSH = """
from hf_gradprune.io.hub import push_folder_to_hub

emit(push_folder_to_hub(args["folder"], args["repo_id"]).oid)
"""

CARD_SNIPPET = """
snippet = args["snippet"]
exec(snippet)
emit([model.bert.encoder.layer[0].attention.self.query.out_features, type(tokenizer).__name__])
"""


def test_pushed_card_snippet_loads_the_model_when_pasted(hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{USER}/snippet"
    folder, _ = pruned_folder(tmp_path, "pruned", repo_id)
    readme = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    run_client(hub, tmp_path, PUSH, hf_token=TOKEN, folder=str(folder), repo_id=repo_id)

    assert run_client(hub, tmp_path, CARD_SNIPPET, snippet=snippet) == [24, "BertTokenizer"]


PUSH_CUT_SHORT = """
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file
from hf_gradprune.io.hub import push_folder_to_hub

def main_weight():
    path = hf_hub_download(args["repo_id"], "model.safetensors", force_download=True)
    return load_file(path)["classifier.weight"].tolist()

first = push_folder_to_hub(args["first"], args["repo_id"])
print("READY", flush=True)
input()  # the test now tells the hub to drop the next request
try:
    push_folder_to_hub(args["second"], args["repo_id"])
    failed = None
except Exception as error:
    failed = type(error).__name__
commits_after_failure = [c.commit_id for c in HfApi().list_repo_commits(args["repo_id"])]
weight_after_failure = main_weight()
second = push_folder_to_hub(args["second"], args["repo_id"])
emit({"first": first.oid, "failed": failed, "after_failure": commits_after_failure,
      "weight_after_failure": weight_after_failure, "second": second.oid, "weight": main_weight(),
      "commits": [c.commit_id for c in HfApi().list_repo_commits(args["repo_id"])]})
"""


@pytest.mark.parametrize("point", ["commit", "lfs-upload"])
def test_push_cut_short_by_the_server_leaves_the_previous_commit_and_lands_whole_when_retried(
    hub: LocalHub, tmp_path: Path, point: str
) -> None:
    repo_id = f"{USER}/cut-{point}"
    first_folder, first_weight = pruned_folder(tmp_path, "first", repo_id, seed=0)
    second_folder, second_weight = pruned_folder(tmp_path, "second", repo_id, seed=1)
    env = hub.client_env(tmp_path / "hf_home", TOKEN)
    prelude = "import json, sys\nargs = json.loads(sys.argv[1])\nemit = lambda v: print(json.dumps(v))\n"
    args = {"first": str(first_folder), "second": str(second_folder), "repo_id": repo_id}
    client = subprocess.Popen(
        [sys.executable, "-c", prelude + PUSH_CUT_SHORT, json.dumps(args)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdout.readline().strip() == "READY"
    # The commit is not retried by the client: the push fails. An LFS upload is, with back-off: cut it on
    # every attempt (1 + 5 retries) so that the push fails too.
    hub.drop_connection(point, times=1 if point == "commit" else 6)
    out, err = client.communicate("go\n", timeout=300)
    assert client.returncode == 0, err[-4000:]
    result = json.loads(out.splitlines()[-1])

    assert result["failed"] is not None
    assert result["after_failure"] == [result["first"]]  # the branch still at the first push
    assert torch.equal(torch.tensor(result["weight_after_failure"]), first_weight)
    assert result["commits"] == [result["second"], result["first"]]
    assert torch.equal(torch.tensor(result["weight"]), second_weight)


def test_push_with_an_upload_cut_once_is_retried_by_the_client_and_lands_whole(
    hub: LocalHub, tmp_path: Path
) -> None:
    repo_id = f"{USER}/cut-once"
    folder, _ = pruned_folder(tmp_path, "pruned", repo_id)
    download = tmp_path / "download"
    hub.drop_connection("lfs-upload")
    out = run_client(
        hub,
        tmp_path,
        PUSH_AND_DOWNLOAD,
        folder=str(folder),
        repo_id=repo_id,
        push_token=TOKEN,
        download=str(download),
    )
    assert out["commits"] == 1
    assert hub._server.failures["lfs-upload"] == 0  # the cut happened
    for name in out["files"]:
        assert (download / name).read_bytes() == (folder / name).read_bytes(), name
