"""Tests of `LocalHub` against the real `huggingface_hub` client.

The client reads `HF_ENDPOINT` and `HF_HUB_DISABLE_XET` when it is imported, so every client call runs in a
fresh interpreter with its own environment (and its own `HF_HOME`: no cache or token of the machine leaks in).
Raw HTTP requests are used only where the client cannot send the request (broken commits, bad LFS uploads,
byte ranges, concurrent commits).
"""

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hf_gradprune.testing.hub import LocalHub

TOKEN = "hf_local_hub_test_token"

CLIENT_PRELUDE = """
import json, sys
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

args = json.loads(sys.argv[1])
api = HfApi(token=args["token"])


def emit(value):
    print(json.dumps(value))
"""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(tmp_path / "hub", token=TOKEN) as running_hub:
        yield running_hub


def run_client(hub: LocalHub, tmp_path: Path, code: str, token: str | bool = TOKEN, **args: Any) -> Any:
    """Run `code` with the real client in a fresh interpreter and return the JSON it `emit`-ted last.

    `code` sees `api = HfApi(token=token)` and the keyword `args` as the dict `args`.
    """
    script = CLIENT_PRELUDE + textwrap.dedent(code)
    payload = json.dumps({"token": token, **args})
    result = subprocess.run(
        [sys.executable, "-c", script, payload],
        env=hub.client_env(tmp_path / "hf_home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def call(
    hub: LocalHub,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    token: str | None = TOKEN,
    **headers: str,
) -> tuple[int, Any, bytes]:
    """Send one raw HTTP request to the hub; returns status, headers and body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(hub.endpoint + path, data=data, method=method, headers=headers)
    try:
        with _NO_PROXY.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def ndjson_commit(summary: str, *operations: dict) -> bytes:
    """An NDJSON commit payload, as `huggingface_hub` sends it."""
    lines = [{"key": "header", "value": {"summary": summary, "description": ""}}, *operations]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def add_file(path: str, content: bytes) -> dict:
    return {
        "key": "file",
        "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"},
    }


def head_sha(hub: LocalHub, repo_id: str) -> str | None:
    status, _, body = call(hub, "GET", f"/api/models/{repo_id}")
    assert status == 200
    return json.loads(body)["sha"]


def test_local_hub_whoami_returns_configured_user(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub", token=TOKEN, user="alice") as hub:
        name = run_client(hub, tmp_path, "emit(api.whoami()['name'])")
    assert name == "alice"


def test_local_hub_push_folder_downloads_identical_bytes(hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"weight": torch.randn(32, 16)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    code = """
    api.create_repo("test-user/tiny", exist_ok=True)
    commit = api.upload_folder(repo_id="test-user/tiny", folder_path=args["folder"], commit_message="Upload")
    info = api.model_info("test-user/tiny", files_metadata=True)
    emit({
        "commit": commit.oid,
        "sha": info.sha,
        "lfs": {sibling.rfilename: sibling.lfs is not None for sibling in info.siblings},
        "snapshot": snapshot_download("test-user/tiny"),
        "config": hf_hub_download("test-user/tiny", "config.json", cache_dir=args["other_cache"]),
    })
    """
    out = run_client(hub, tmp_path, code, folder=str(folder), other_cache=str(tmp_path / "other_cache"))

    assert out["sha"] == out["commit"]
    assert out["lfs"] == {"config.json": False, "model.safetensors": True}
    snapshot = Path(out["snapshot"])
    assert sorted(path.name for path in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()
    assert Path(out["config"]).read_bytes() == (folder / "config.json").read_bytes()


def test_local_hub_commit_sha_revision_serves_old_content(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    api.create_repo("test-user/versions")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="test-user/versions").oid
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="test-user/versions")

    def read(revision):
        with open(hf_hub_download("test-user/versions", "notes.txt", revision=revision)) as file:
            return file.read()

    emit({
        "first": first,
        "commits": [commit.commit_id for commit in api.list_repo_commits("test-user/versions")],
        "at_first": read(first),
        "at_main": read("main"),
        "info_sha": api.model_info("test-user/versions", revision=first).sha,
        "snapshot": snapshot_download("test-user/versions", revision=first),
    })
    """
    out = run_client(hub, tmp_path, code)

    assert len(out["commits"]) == 2
    assert out["commits"][1] == out["first"]  # newest first
    assert (out["at_first"], out["at_main"]) == ("v1", "v2")
    assert out["info_sha"] == out["first"]
    assert (Path(out["snapshot"]) / "notes.txt").read_text() == "v1"


def test_local_hub_writes_need_the_token(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    attempts = {
        "create_without_token": lambda: HfApi(token=False).create_repo("test-user/never"),
        "create_with_wrong_token": lambda: HfApi(token="wrong").create_repo("test-user/never"),
        "upload_with_wrong_token": lambda: HfApi(token="wrong").upload_file(
            path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id="test-user/locked"
        ),
        "upload_binary_without_token": lambda: HfApi(token=False).upload_file(
            path_or_fileobj=b"\\0binary", path_in_repo="weights.bin", repo_id="test-user/locked"
        ),
    }
    statuses = {}
    api.create_repo("test-user/locked")
    for name, attempt in attempts.items():
        try:
            attempt()
            statuses[name] = "succeeded"
        except HfHubHTTPError as error:
            statuses[name] = error.response.status_code
    emit(statuses)
    """
    statuses = run_client(hub, tmp_path, code)

    assert set(statuses.values()) == {401}
    assert not (hub.root / "models" / "test-user" / "never").exists()
    locked = hub.root / "models" / "test-user" / "locked"
    for folder in ("objects", "commits", "refs"):
        assert not any((locked / folder).iterdir())
    batch = {"operation": "upload", "objects": [{"oid": "0" * 64, "size": 1}]}
    assert call(hub, "POST", "/test-user/locked.git/info/lfs/objects/batch", batch, token=None)[0] == 401


def test_local_hub_serves_private_repositories_only_with_the_token(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    from huggingface_hub.errors import RepositoryNotFoundError
    for repo_id, private in (("test-user/secret", True), ("test-user/open", False)):
        api.create_repo(repo_id, private=private)
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id=repo_id)
    seen = {}
    for who, token in (("owner", args["token"]), ("anonymous", False), ("wrong", "wrong-token")):
        for repo_id in ("test-user/secret", "test-user/open"):
            try:
                path = hf_hub_download(repo_id, "a.txt", token=token, cache_dir=f"{args['cache']}/{who}")
                seen[f"{who} {repo_id}"] = open(path).read()
            except RepositoryNotFoundError:
                seen[f"{who} {repo_id}"] = "not found"
    emit(seen)
    """
    seen = run_client(hub, tmp_path, code, cache=str(tmp_path / "caches"))
    assert seen == {
        "owner test-user/secret": "hello",
        "owner test-user/open": "hello",
        "anonymous test-user/secret": "not found",
        "anonymous test-user/open": "hello",
        "wrong test-user/secret": "not found",
        "wrong test-user/open": "hello",
    }
    assert call(hub, "GET", "/api/models/test-user/secret", token=None)[0] == 404
    assert call(hub, "GET", "/api/models/test-user/secret/tree/main", token=None)[0] == 404


def test_local_hub_failed_commit_leaves_repo_unchanged(hub: LocalHub) -> None:
    assert call(hub, "POST", "/api/repos/create", {"name": "atomic"})[0] == 200
    ok = ndjson_commit("first", add_file("a.txt", b"old"))
    assert call(hub, "POST", "/api/models/test-user/atomic/commit/main", ok)[0] == 200
    before = head_sha(hub, "test-user/atomic")

    missing_lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    broken = ndjson_commit("second", add_file("a.txt", b"new"), add_file("b.txt", b"b"), missing_lfs)
    status, _, body = call(hub, "POST", "/api/models/test-user/atomic/commit/main", broken)

    assert status == 400
    assert "never uploaded" in json.loads(body)["error"]
    assert head_sha(hub, "test-user/atomic") == before
    assert call(hub, "GET", "/test-user/atomic/resolve/main/a.txt")[2] == b"old"
    assert call(hub, "HEAD", "/test-user/atomic/resolve/main/b.txt")[0] == 404
    assert len(list((hub.root / "models" / "test-user" / "atomic" / "commits").iterdir())) == 1


def test_local_hub_delete_operations_remove_files(hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    (folder / "sub").mkdir(parents=True)
    for name in ("keep.txt", "drop.txt", "sub/one.txt", "sub/two.txt"):
        (folder / name).write_text(name)
    code = """
    api.create_repo("test-user/pruned")
    api.upload_folder(repo_id="test-user/pruned", folder_path=args["folder"])
    api.delete_file("drop.txt", repo_id="test-user/pruned")
    api.create_commit(
        "test-user/pruned", operations=[CommitOperationDelete("sub/")], commit_message="Remove sub/"
    )
    emit(api.list_repo_files("test-user/pruned"))
    """
    assert run_client(hub, tmp_path, code, folder=str(folder)) == ["keep.txt"]


def test_local_hub_missing_targets_raise_client_errors(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    api.create_repo("test-user/present")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="test-user/present")
    errors = {}
    for name, repo_id, filename, revision in [
        ("repo", "test-user/absent", "config.json", "main"),
        ("revision", "test-user/present", "config.json", "f" * 40),
        ("entry", "test-user/present", "missing.json", "main"),
    ]:
        try:
            hf_hub_download(repo_id, filename, revision=revision)
            errors[name] = None
        except HfHubHTTPError as error:
            errors[name] = type(error).__name__
    emit(errors)
    """
    assert run_client(hub, tmp_path, code) == {
        "repo": "RepositoryNotFoundError",
        "revision": "RevisionNotFoundError",
        "entry": "RemoteEntryNotFoundError",
    }


def test_local_hub_create_repo_conflicts_and_repo_types(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    def status(**kwargs):
        try:
            api.create_repo(**kwargs)
            return 200
        except HfHubHTTPError as error:
            return error.response.status_code

    emit({
        "first": status(repo_id="test-user/twice"),
        "again": status(repo_id="test-user/twice"),
        "exist_ok": status(repo_id="test-user/twice", exist_ok=True),
        "dataset": status(repo_id="test-user/data", repo_type="dataset"),
    })
    """
    assert run_client(hub, tmp_path, code) == {"first": 200, "again": 409, "exist_ok": 200, "dataset": 400}


def test_local_hub_tree_lists_folders_and_lfs_metadata(hub: LocalHub, tmp_path: Path) -> None:
    code = """
    api.create_repo("test-user/tree")
    api.create_commit("test-user/tree", commit_message="Add", operations=[
        CommitOperationAdd("README.md", b"# tree"),
        CommitOperationAdd("ckpt/step-1/weights.bin", b"\\0" * 64),
    ])

    def describe(entries):
        return [[entry.path, type(entry).__name__, getattr(entry, "lfs", None)] for entry in entries]

    emit({
        "top": describe(api.list_repo_tree("test-user/tree")),
        "recursive": describe(api.list_repo_tree("test-user/tree", recursive=True)),
        "paths": describe(api.get_paths_info("test-user/tree", ["ckpt", "README.md", "absent"])),
    })
    """
    out = run_client(hub, tmp_path, code)

    oid = hashlib.sha256(b"\0" * 64).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 64\n"
    lfs = {"size": 64, "sha256": oid, "pointer_size": len(pointer)}
    assert out["top"] == [["README.md", "RepoFile", None], ["ckpt", "RepoFolder", None]]
    assert out["recursive"] == [
        ["README.md", "RepoFile", None],
        ["ckpt", "RepoFolder", None],
        ["ckpt/step-1", "RepoFolder", None],
        ["ckpt/step-1/weights.bin", "RepoFile", lfs],
    ]
    assert out["paths"] == [["ckpt", "RepoFolder", None], ["README.md", "RepoFile", None]]


def test_local_hub_lfs_upload_rejects_wrong_content(hub: LocalHub) -> None:
    assert call(hub, "POST", "/api/repos/create", {"name": "lfs"})[0] == 200
    content = b"real weights"
    oid = hashlib.sha256(content).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(content)}]}
    status, _, body = call(hub, "POST", "/test-user/lfs.git/info/lfs/objects/batch", batch)
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    upload_path = href.removeprefix(hub.endpoint)

    assert call(hub, "PUT", upload_path, b"fake weights", token=None)[0] == 400
    assert not (hub.root / "models" / "test-user" / "lfs" / "objects" / oid).exists()
    assert call(hub, "PUT", upload_path, content, token=None)[0] == 200
    assert (hub.root / "models" / "test-user" / "lfs" / "objects" / oid).read_bytes() == content


def test_local_hub_resolve_serves_byte_ranges(hub: LocalHub) -> None:
    assert call(hub, "POST", "/api/repos/create", {"name": "ranges"})[0] == 200
    commit = ndjson_commit("Add", add_file("data.txt", b"0123456789"))
    assert call(hub, "POST", "/api/models/test-user/ranges/commit/main", commit)[0] == 200

    status, headers, body = call(hub, "GET", "/test-user/ranges/resolve/main/data.txt", Range="bytes=2-5")
    assert (status, body, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    assert call(hub, "GET", "/test-user/ranges/resolve/main/data.txt", Range="bytes=-3")[2] == b"789"
    assert call(hub, "GET", "/test-user/ranges/resolve/main/data.txt", Range="bytes=10-")[0] == 416


def test_local_hub_concurrent_commits_all_land(hub: LocalHub) -> None:
    assert call(hub, "POST", "/api/repos/create", {"name": "busy"})[0] == 200
    statuses: list[int] = []

    def push(index: int) -> None:
        commit = ndjson_commit(f"file {index}", add_file(f"file-{index}.txt", str(index).encode()))
        statuses.append(call(hub, "POST", "/api/models/test-user/busy/commit/main", commit)[0])

    threads = [threading.Thread(target=push, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 8
    commits = json.loads(call(hub, "GET", "/api/models/test-user/busy/commits/main")[2])
    assert len(commits) == 8
    tree = json.loads(call(hub, "GET", "/api/models/test-user/busy/tree/main")[2])
    assert sorted(entry["path"] for entry in tree) == [f"file-{index}.txt" for index in range(8)]


def test_local_hub_cli_serves_until_terminated(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "hf_gradprune.testing.hub",
        "--root",
        str(tmp_path / "hub"),
        "--token",
        TOKEN,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = process.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), process.stderr.read()
        request = urllib.request.Request(
            f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with _NO_PROXY.open(request, timeout=30) as response:
            assert json.load(response)["name"] == "test-user"
    finally:
        process.terminate()
        returncode = process.wait(timeout=30)
    assert returncode == 0
