"""A local server speaking enough of the Hugging Face Hub HTTP protocol for the real `huggingface_hub` client.

Point `HF_ENDPOINT` at `LocalHub.endpoint` and set `HF_HUB_DISABLE_XET=1` (this server has no Xet storage)
*before* `huggingface_hub` is imported: the client reads both when it is imported. Then `create_repo`,
`upload_folder`, `create_commit` (regular and LFS files, file and folder deletions), `model_info`,
`list_repo_files`, `list_repo_tree`, `list_repo_commits`, `list_repo_refs`, `get_paths_info`,
`hf_hub_download` and `snapshot_download` (at a branch or at a full commit sha) work offline.

Only model repositories are served, and new repositories start empty (the real Hub makes a first
`.gitattributes` commit). Reads need no token; every write needs the token the server was started with.

Repositories are stored under `root/models/<namespace>/<name>/`:

- `objects/<sha256>`: file contents, content-addressed (regular and LFS files alike),
- `commits/<commit id>.json`: parent, author, date, message and the full `{path: file}` manifest; the
  commit id is the sha1 of this JSON,
- `refs/<branch>`: the commit id at the head of the branch,
- `repo.json`: creation date and visibility,
- `tmp/`: staging area.

A commit stages its new blobs and checks every operation before it moves the branch with `os.replace`,
so it lands whole or not at all.

Example:

```python
>>> import os, subprocess, sys
>>> from hf_gradprune.testing import LocalHub

>>> with LocalHub("/tmp/local-hub", token="secret") as hub:
...     env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1"}
...     code = "from huggingface_hub import HfApi; print(HfApi(token='secret').whoami()['name'])"
...     _ = subprocess.run([sys.executable, "-c", code], env=env, check=True)
test-user
```

From a shell: `python -m hf_gradprune.testing.hub --root DIR --port 8000 --token secret` prints the
endpoint and serves until Ctrl-C or SIGTERM.
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
# Files larger than this, binary files (NUL byte in the first 512 bytes) and files with these suffixes
# (those of the Hub's default `.gitattributes`, plus images and GGUF) are uploaded through LFS.
LFS_SIZE_THRESHOLD = 1_000_000
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gif", ".gz", ".h5", ".jpeg", ".jpg",
    ".joblib", ".mlmodel", ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb",
    ".pickle", ".pkl", ".png", ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm",
    ".webp", ".xz", ".zip", ".zst",
)  # fmt: skip
_OTHER_REPO_TYPES = ("datasets", "spaces", "kernels")
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_COMMIT_ID_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
_CHUNK_SIZE = 1 << 20


FAILURE_POINTS = ("commit", "lfs-upload")
"""Requests :meth:`LocalHub.drop_connection` can cut: the commit, and the upload of a large (LFS) file."""


class _Dropped(Exception):
    """The connection was dropped on purpose; no response is sent."""


class _HubError(Exception):
    """An error answered to the client, with the Hub's `X-Error-Code` when the client relies on one."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class _Upload:
    """An LFS upload announced through the batch API, waiting for its PUT."""

    repo: Path
    oid: str
    size: int


def _now() -> str:
    """Current UTC time in the Hub's format, e.g. `2024-05-01T12:00:00.000Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob, as `git hash-object` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file standing for a blob in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub would ask for this file to be uploaded through LFS."""
    return size > LFS_SIZE_THRESHOLD or b"\0" in sample or path.lower().endswith(LFS_SUFFIXES)


def _check_path(path: Any) -> str:
    """Return `path` if it is a valid relative file path in a repository, else raise a 400."""
    if not isinstance(path, str) or any(part in ("", ".", "..", ".git") for part in path.split("/")):
        raise _HubError(400, f"Invalid path in repository: {path!r}")
    return path


def _atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write `data` to a temporary file in `tmp_dir`, then move it over `path` in one step."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


def _file_item(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it."""
    item: dict[str, Any] = {"type": "file", "oid": entry["blobId"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return item


def _folder_item(path: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A folder as the tree and paths-info endpoints describe it (its oid hashes the files below it)."""
    digest = hashlib.sha1()
    for file_path in sorted(files):
        if file_path.startswith(f"{path}/"):
            digest.update(f"{file_path}\0{files[file_path]['blobId']}\n".encode())
    return {"type": "directory", "oid": digest.hexdigest(), "path": path}


def _list_tree(files: dict[str, dict[str, Any]], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders below `folder` ("" for the root), sorted by path."""
    prefix = f"{folder}/" if folder else ""
    below = [path for path in files if path.startswith(prefix)]
    if folder and not below:
        raise _HubError(404, f"Folder not found: {folder}", "EntryNotFound")
    folders: set[str] = set()
    items = []
    for path in below:
        parts = path[len(prefix) :].split("/")
        depths = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
        folders.update(prefix + "/".join(parts[:depth]) for depth in depths)
        if recursive or len(parts) == 1:
            items.append(_file_item(path, files[path]))
    items.extend(_folder_item(path, files) for path in folders)
    return sorted(items, key=lambda item: item["path"])


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """Start and (exclusive) end of a single `bytes=` range; raises a 416 if it cannot be served."""
    match = _RANGE_RE.fullmatch(header)
    if match and (match[1] or match[2]):
        if match[1]:
            start, end = int(match[1]), min(int(match[2]) + 1, size) if match[2] else size
        else:
            start, end = max(size - int(match[2]), 0), size
        if start < end:
            return start, end
    raise _HubError(416, f"Cannot serve range {header!r}", headers={"Content-Range": f"bytes */{size}"})


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Split an NDJSON commit payload into its header value and its `(key, value)` operations."""
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError as error:
        raise _HubError(400, f"Commit payload is not NDJSON: {error}") from None
    if not lines or not all(isinstance(line, dict) and isinstance(line.get("value"), dict) for line in lines):
        raise _HubError(400, "Each commit payload line must be an object with a `key` and a `value` object")
    if lines[0].get("key") != "header":
        raise _HubError(400, "The first commit payload line must be the header")
    return lines[0]["value"], [(line.get("key"), line["value"]) for line in lines[1:]]


class _Store:
    """The repositories under `root/models`, and the commit logic."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()

    def create_repo(self, namespace: str, name: str, private: bool) -> bool:
        """Create an empty repository; returns `False` if it already exists."""
        if not (_NAME_RE.fullmatch(namespace) and _NAME_RE.fullmatch(name)) or name.endswith(".git"):
            raise _HubError(400, f"Invalid repository id: {namespace}/{name}")
        if namespace in _OTHER_REPO_TYPES:
            raise _HubError(400, f"'{namespace}' cannot be used as a namespace")
        target = self.root / "models" / namespace / name
        with self.lock:
            if target.exists():
                return False
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".creating-"))
            for folder in ("objects", "commits", "refs", "tmp"):
                (staging / folder).mkdir()
            (staging / "repo.json").write_text(json.dumps({"createdAt": _now(), "private": private}))
            os.rename(staging, target)
        return True

    def repo(self, repo_id: str) -> Path:
        """Folder of an existing repository; raises `RepoNotFound` otherwise."""
        namespace, _, name = repo_id.partition("/")
        path = self.root / "models" / namespace / name
        if not (
            _NAME_RE.fullmatch(namespace) and _NAME_RE.fullmatch(name) and (path / "repo.json").is_file()
        ):
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return path

    @staticmethod
    def meta(repo: Path) -> dict[str, Any]:
        """Creation date and visibility of a repository."""
        return json.loads((repo / "repo.json").read_text())

    @staticmethod
    def branches(repo: Path) -> dict[str, str]:
        """Branch names mapped to their head commit ids."""
        return {ref.name: ref.read_text() for ref in sorted((repo / "refs").iterdir())}

    @staticmethod
    def branch_head(repo: Path, branch: str) -> str | None:
        """Head commit id of `branch`; `None` for the default branch of an empty repository."""
        ref = repo / "refs" / branch
        if _NAME_RE.fullmatch(branch) and ref.is_file():
            return ref.read_text()
        if branch == DEFAULT_BRANCH:
            return None
        raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")

    def resolve(self, repo: Path, revision: str) -> str | None:
        """Commit id of a branch or a full commit sha; `None` for the default branch of an empty repo."""
        if _COMMIT_ID_RE.fullmatch(revision) and (repo / "commits" / f"{revision}.json").is_file():
            return revision
        return self.branch_head(repo, revision)

    @staticmethod
    def read_commit(repo: Path, commit_id: str) -> dict[str, Any]:
        """A stored commit: parent, author, date, title, message and files."""
        return json.loads((repo / "commits" / f"{commit_id}.json").read_bytes())

    def files(self, repo: Path, commit_id: str | None) -> dict[str, dict[str, Any]]:
        """The `{path: entry}` manifest of a commit (empty for `None`)."""
        return self.read_commit(repo, commit_id)["files"] if commit_id else {}

    def history(self, repo: Path, commit_id: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Commits from `commit_id` back to the first one, newest first."""
        while commit_id:
            commit = self.read_commit(repo, commit_id)
            yield commit_id, commit
            commit_id = commit["parent"]

    @staticmethod
    def put_object(repo: Path, oid: str, chunks: Iterable[bytes]) -> None:
        """Store an uploaded LFS object once its content is checked against its sha256."""
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=repo / "tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                for chunk in chunks:
                    digest.update(chunk)
                    file.write(chunk)
            if digest.hexdigest() != oid:
                raise _HubError(400, f"Uploaded content does not match its sha256 {oid}")
            os.replace(tmp, repo / "objects" / oid)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def commit(self, repo: Path, branch: str, body: bytes, author: str) -> str:
        """Apply an NDJSON commit payload to `branch` and return the new commit id.

        Args:
            repo (`Path`):
                Folder of the repository.
            branch (`str`):
                Branch to commit to.
            body (`bytes`):
                The NDJSON payload sent by `huggingface_hub` (header, then one operation per line).
            author (`str`):
                User name recorded as the commit author.
        """
        header, operations = _parse_commit_payload(body)
        with tempfile.TemporaryDirectory(dir=repo / "tmp") as staging_dir:
            staging = Path(staging_dir)
            changes = [self._stage(repo, staging, key, value) for key, value in operations]
            with self.lock:
                parent = self.branch_head(repo, branch)
                expected_parent = header.get("parentCommit")
                if expected_parent and not (parent or "").startswith(expected_parent):
                    raise _HubError(412, "A commit has happened since. Please refresh and try again.")
                files = dict(self.files(repo, parent))
                for key, path, entry in changes:
                    self._apply(files, key, path, entry)
                folders = {
                    path.rsplit("/", depth)[0] for path in files for depth in range(1, path.count("/") + 1)
                }
                if clashes := sorted(folders & files.keys()):
                    raise _HubError(400, f"{clashes[0]!r} cannot be both a file and a folder")
                for blob in staging.iterdir():
                    os.replace(blob, repo / "objects" / blob.name)
                commit = {
                    "parent": parent,
                    "author": author,
                    "date": _now(),
                    "title": str(header.get("summary") or ""),
                    "message": str(header.get("description") or ""),
                    "files": files,
                }
                data = json.dumps(commit, sort_keys=True, indent=1).encode()
                commit_id = hashlib.sha1(data).hexdigest()
                _atomic_write(repo / "commits" / f"{commit_id}.json", data, repo / "tmp")
                _atomic_write(repo / "refs" / branch, commit_id.encode(), repo / "tmp")
        return commit_id

    @staticmethod
    def _stage(repo: Path, staging: Path, key: Any, value: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """Check one commit operation, write the blob of a regular file to `staging`."""
        if key == "file":
            path = _check_path(value.get("path"))
            if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                raise _HubError(400, f"The content of {path} must be a base64 string")
            try:
                data = base64.b64decode(value["content"], validate=True)
            except binascii.Error:
                raise _HubError(400, f"Invalid base64 content for {path}") from None
            sha256 = hashlib.sha256(data).hexdigest()
            (staging / sha256).write_bytes(data)
            entry = {"sha256": sha256, "size": len(data), "lfs": False, "blobId": _git_blob_id(data)}
            return "add", path, entry
        if key == "lfsFile":
            path = _check_path(value.get("path"))
            oid = value.get("oid")
            blob = repo / "objects" / str(oid)
            if (
                value.get("algo", "sha256") != "sha256"
                or not _SHA256_RE.fullmatch(str(oid))
                or not blob.is_file()
            ):
                raise _HubError(400, f"LFS object {oid} for {path} was never uploaded")
            size = blob.stat().st_size
            if value.get("size", size) != size:
                raise _HubError(400, f"LFS object {oid} for {path} has {size} bytes, not {value['size']}")
            entry = {
                "sha256": oid,
                "size": size,
                "lfs": True,
                "blobId": _git_blob_id(_lfs_pointer(oid, size)),
            }
            return "add", path, entry
        if key in ("deletedFile", "deletedFolder"):
            path = value.get("path")
            return key, _check_path(path.rstrip("/") if isinstance(path, str) else path), {}
        raise _HubError(400, f"Unknown commit operation: {key!r}")

    @staticmethod
    def _apply(files: dict[str, dict[str, Any]], key: str, path: str, entry: dict[str, Any]) -> None:
        """Apply one staged operation to a manifest."""
        if key == "add":
            files[path] = entry
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        else:
            inside = [p for p in files if p.startswith(f"{path}/")]
            if not inside:
                raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for file_path in inside:
                del files[file_path]


class _Server(ThreadingHTTPServer):
    """The HTTP server, holding what its request handlers share."""

    def __init__(self, address: tuple[str, int], store: _Store, token: str, user: str) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.token = token
        self.user = user
        self.uploads: dict[str, _Upload] = {}
        self.lock = threading.Lock()  # guards `uploads` and `failures`
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_POINTS, 0)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the Hub endpoint it stands for."""

    server: _Server
    server_version = "LocalHub"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        self._unread = 0
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise _HubError(411, "Chunked request bodies are not supported, send a Content-Length")
            try:
                self._unread = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise _HubError(400, "Invalid Content-Length") from None
            self._route(method, [unquote(part) for part in url.path.split("/")[1:]])
        except _HubError as error:
            self._discard_body()
            self._send_error(error)
        except _Dropped:
            logger.debug("Dropped the connection during %s %s on purpose", method, self.path)
        except ConnectionError:
            logger.debug("Client went away during %s %s", method, self.path)
        except Exception:
            logger.exception("LocalHub failed on %s %s", method, self.path)
            self._discard_body()
            self._send_error(_HubError(500, "Internal error in LocalHub, see its log"))

    def _route(self, method: str, parts: list[str]) -> None:
        match method, parts:
            case "GET", ["api", "whoami-v2"]:
                self._whoami()
            case "POST", ["api", "repos", "create"]:
                self._create_repo()
            case "POST", ["api", "validate-yaml"]:
                self._discard_body()
                self._send_json({"errors": [], "warnings": []})
            case _, ["api", ("datasets" | "spaces" | "kernels"), *_] | _, [
                ("datasets" | "spaces" | "kernels"),
                *_,
            ]:
                raise _HubError(400, "LocalHub only serves model repositories")
            case "GET", ["api", "models", namespace, name]:
                self._model_info(f"{namespace}/{name}", DEFAULT_BRANCH)
            case "GET", ["api", "models", namespace, name, "revision", revision]:
                self._model_info(f"{namespace}/{name}", revision)
            case "GET", ["api", "models", namespace, name, "tree", revision, *folder]:
                self._tree(f"{namespace}/{name}", revision, "/".join(folder).strip("/"))
            case "POST", ["api", "models", namespace, name, "paths-info", revision]:
                self._paths_info(f"{namespace}/{name}", revision)
            case "GET", ["api", "models", namespace, name, "commits", revision]:
                self._commits(f"{namespace}/{name}", revision)
            case "GET", ["api", "models", namespace, name, "refs"]:
                self._refs(f"{namespace}/{name}")
            case "POST", ["api", "models", namespace, name, "preupload", revision]:
                self._preupload(f"{namespace}/{name}", revision)
            case "POST", ["api", "models", namespace, name, "commit", revision]:
                self._commit(f"{namespace}/{name}", revision)
            case "POST", [namespace, name, "info", "lfs", "objects", "batch"] if name.endswith(".git"):
                self._lfs_batch(f"{namespace}/{name.removesuffix('.git')}")
            case "PUT", ["lfs-upload", upload_id]:
                self._lfs_upload(upload_id)
            case (("GET" | "HEAD"), [namespace, name, "resolve", revision, *path]) if path:
                self._resolve(f"{namespace}/{name}", revision, "/".join(path))
            case _:
                raise _HubError(404, f"{method} {self.path} is not served by LocalHub")

    # Endpoints

    def _whoami(self) -> None:
        self._require_token()
        user = self.server.user
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "LocalHub", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._json_body()
        if payload.get("type", "model") not in (None, "model"):
            raise _HubError(400, f"LocalHub only serves model repositories, not {payload['type']!r} ones")
        namespace = str(payload.get("organization") or self.server.user)
        name = str(payload.get("name"))
        url = f"{self._endpoint}/{namespace}/{name}"
        if self.server.store.create_repo(namespace, name, private=payload.get("visibility") == "private"):
            self._send_json({"url": url, "name": f"{namespace}/{name}"})
        else:
            message = "You already created this model repo"
            self._send_json({"error": message, "url": url}, status=409, headers={"X-Error-Message": message})

    def _model_info(self, repo_id: str, revision: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        meta = store.meta(repo)
        commit_id = store.resolve(repo, revision)
        commit = store.read_commit(repo, commit_id) if commit_id else {"date": meta["createdAt"], "files": {}}
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if self._flag("blobs"):
                sibling.update(size=entry["size"], blobId=entry["blobId"])
                if entry["lfs"]:
                    pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
                    sibling["lfs"] = {
                        "sha256": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": pointer_size,
                    }
            siblings.append(sibling)
        self._send_json(
            {
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit_id,
                "lastModified": commit["date"],
                "createdAt": meta["createdAt"],
                "private": meta["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
            }
        )

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        files = store.files(repo, store.resolve(repo, revision))
        self._send_json(_list_tree(files, folder, recursive=self._flag("recursive")))

    def _paths_info(self, repo_id: str, revision: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        files = store.files(repo, store.resolve(repo, revision))
        items = []
        for path in parse_qs(self._body().decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                items.append(_file_item(path, files[path]))
            elif any(file_path.startswith(f"{path}/") for file_path in files):
                items.append(_folder_item(path, files))
        self._send_json(items)

    def _commits(self, repo_id: str, revision: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        self._send_json(
            [
                {
                    "id": commit_id,
                    "title": commit["title"],
                    "message": commit["message"],
                    "date": commit["date"],
                    "authors": [{"user": commit["author"]}],
                }
                for commit_id, commit in store.history(repo, store.resolve(repo, revision))
            ]
        )

    def _refs(self, repo_id: str) -> None:
        branches = self.server.store.branches(self._repo(repo_id))
        self._send_json(
            {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
                    for name, commit_id in branches.items()
                ],
                "converts": [],
                "tags": [],
                "pullRequests": [],
            }
        )

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        store = self.server.store
        repo = self._repo(repo_id)
        existing = store.files(repo, store.branch_head(repo, revision))
        answers = []
        for file in self._json_body().get("files", []):
            path = _check_path(file.get("path"))
            try:
                sample = base64.b64decode(file.get("sample", ""), validate=True)
            except binascii.Error:
                raise _HubError(400, f"Invalid base64 sample for {path}") from None
            lfs = _is_lfs(path, int(file.get("size", 0)), sample)
            entry = existing.get(path)
            oid = (entry["sha256"] if lfs else entry["blobId"]) if entry else None
            answers.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send_json({"files": answers, "commitOid": store.branch_head(repo, revision)})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._flag("create_pr"):
            raise _HubError(400, "LocalHub does not support pull requests")
        repo = self._repo(repo_id)
        self._maybe_drop("commit")
        commit_id = self.server.store.commit(repo, revision, self._body(), author=self.server.user)
        self._send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self._endpoint}/{repo_id}/commit/{commit_id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_token()
        repo = self._repo(repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise _HubError(400, "LocalHub only supports the LFS `upload` operation")
        answers = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            answer: dict[str, Any] = {"oid": str(oid), "size": size if isinstance(size, int) else -1}
            if not (_SHA256_RE.fullmatch(str(oid)) and isinstance(size, int) and size >= 0):
                answer["error"] = {"code": 422, "message": "Invalid oid or size"}
            elif not (repo / "objects" / oid).is_file():
                # Like the Hub's pre-signed storage URLs, the upload URL is the credential: the client PUTs
                # to it without a token, and it stays valid until the upload succeeds.
                upload_id = secrets.token_hex(16)
                with self.server.lock:
                    self.server.uploads[upload_id] = _Upload(repo, oid, size)
                href = f"{self._endpoint}/lfs-upload/{upload_id}"
                answer.update(authenticated=True, actions={"upload": {"href": href}})
            answers.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, upload_id: str) -> None:
        with self.server.lock:
            upload = self.server.uploads.get(upload_id)
        if upload is None:
            raise _HubError(404, "Unknown or already used upload URL")
        if self._unread != upload.size:
            raise _HubError(400, f"Expected {upload.size} bytes, got a Content-Length of {self._unread}")
        self._maybe_drop("lfs-upload")
        self.server.store.put_object(upload.repo, upload.oid, self._iter_body())
        with self.server.lock:
            self.server.uploads.pop(upload_id, None)
        self._send_headers(200, 0, {})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        commit_id = store.resolve(repo, revision)
        headers = {"X-Repo-Commit": commit_id} if commit_id else {}
        entry = store.files(repo, commit_id).get(path)
        if entry is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        size = entry["size"]
        headers.update({"ETag": f'"{entry["blobId"]}"', "Accept-Ranges": "bytes"})
        headers["Content-Type"] = "application/octet-stream"
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size, 200
        if "Range" in self.headers:
            start, end = _parse_range(self.headers["Range"], size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._send_headers(status, end - start, headers)
        if self.command == "GET":
            with open(repo / "objects" / entry["sha256"], "rb") as file:
                file.seek(start)
                remaining = end - start
                while remaining:
                    chunk = file.read(min(remaining, _CHUNK_SIZE))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)

    # Helpers

    @property
    def _endpoint(self) -> str:
        """Base URL the client used to reach this server."""
        host, port = self.server.server_address[:2]
        return f"http://{self.headers.get('Host') or f'{host}:{port}'}"

    def _flag(self, name: str) -> bool:
        return self._query.get(name, [""])[-1].lower() in ("1", "true")

    def _maybe_drop(self, point: str) -> None:
        """Drop the connection half-way through the request body if a failure at ``point`` is due."""
        with self.server.lock:
            due = self.server.failures[point] > 0
            self.server.failures[point] -= due
        if not due:
            return
        self.rfile.read(self._unread // 2)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        raise _Dropped

    def _authorized(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.server.token.encode())

    def _require_token(self) -> None:
        if not self._authorized():
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Path:
        """An existing repository the request may see: a private one only with the token (as the Hub,
        which answers "not found" rather than reveal that it exists)."""
        repo = self.server.store.repo(repo_id)
        if self.server.store.meta(repo)["private"] and not self._authorized():
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _iter_body(self) -> Iterator[bytes]:
        """The request body, chunk by chunk (each byte is read once)."""
        while self._unread:
            chunk = self.rfile.read(min(self._unread, _CHUNK_SIZE))
            if not chunk:
                self._unread = 0
                raise _HubError(400, "Request body is shorter than its Content-Length")
            self._unread -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict[str, Any]:
        try:
            payload = json.loads(self._body())
        except ValueError:
            raise _HubError(400, "Request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise _HubError(400, "Request body must be a JSON object")
        return payload

    def _discard_body(self) -> None:
        """Read what is left of the body, so that the client can read the response."""
        try:
            for _ in self._iter_body():
                pass
        except _HubError:
            self.close_connection = True

    def _send_headers(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_json(
        self,
        data: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        body = json.dumps(data).encode()
        self._send_headers(status, len(body), {"Content-Type": content_type, **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: _HubError) -> None:
        headers = {
            "X-Error-Message": error.message.encode("ascii", "backslashreplace").decode(),
            **error.headers,
        }
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, status=error.status, headers=headers)


class LocalHub:
    """A local stand-in for the Hugging Face Hub, serving the repositories stored under `root`.

    Use it as a context manager (or call `start()` / `stop()`), and give `endpoint` to the client as
    `HF_ENDPOINT` together with `HF_HUB_DISABLE_XET=1`.

    Args:
        root (`str` or `os.PathLike`):
            Folder holding the repositories. Created if missing, and left in place by `stop()`.
        token (`str`):
            The token every write must carry (`Authorization: Bearer <token>`); others get HTTP 401.
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            IPv4 address to listen on.
        port (`int`, *optional*, defaults to `0`):
            Port to listen on; `0` picks a free one (read it back from `endpoint`).
        user (`str`, *optional*, defaults to `"test-user"`):
            User name answered by `whoami`, and namespace of repositories created without one.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = "test-user",
    ) -> None:
        if not token:
            raise ValueError("LocalHub needs a non-empty token")
        self.root = Path(root)
        self.token = token
        self.host = host
        self.port = port
        self.user = user
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Base URL of the running server, e.g. `http://127.0.0.1:54321`."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running, call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, hf_home: str | os.PathLike, token: str | None = None) -> dict[str, str]:
        """Environment for a process whose ``huggingface_hub`` client should talk to this server.

        The machine's own ``HF_*`` settings (tokens, caches) are left out; ``HF_TOKEN`` is ``token`` when
        given. The client reads these when it is imported, so pass them to a new process.

        Args:
            hf_home (`str` or `os.PathLike`): the client's ``HF_HOME`` (its cache and stored token).
            token (`str`, *optional*): the client's ``HF_TOKEN``.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=os.fspath(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def drop_connection(self, point: str, times: int = 1) -> None:
        """Make the next ``times`` requests at ``point`` fail: the server reads half of the request body,
        then closes the connection without an answer, as a server that goes away mid-upload.

        Args:
            point (`str`): ``"commit"`` (the commit request) or ``"lfs-upload"`` (a large file's upload).
            times (`int`, *optional*, defaults to 1): how many such requests fail.
        """
        if point not in FAILURE_POINTS:
            raise ValueError(f"`point` must be one of {FAILURE_POINTS}, got {point!r}.")
        if self._server is None:
            raise RuntimeError("LocalHub is not running, call start() first")
        with self._server.lock:
            self._server.failures[point] += times

    def start(self) -> "LocalHub":
        """Start serving in a background thread and return `self`."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = _Server((self.host, self.port), _Store(self.root), self.token, self.user)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (a no-op if not running); the repositories stay on disk."""
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve a `LocalHub` until Ctrl-C or SIGTERM, after printing its endpoint on stdout."""
    parser = argparse.ArgumentParser(prog="python -m hf_gradprune.testing.hub", description=main.__doc__)
    parser.add_argument("--root", required=True, help="folder holding the repositories")
    parser.add_argument("--token", required=True, help="token required for writes")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: 0, a free port)")
    parser.add_argument("--user", default="test-user", help="user name answered by whoami")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with LocalHub(args.root, token=args.token, host=args.host, port=args.port, user=args.user) as hub:
        print(hub.endpoint, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
