"""The repositories a `LocalHub` serves, as files on disk, and how a commit changes them.

Repositories are stored under `root/models/<namespace>/<name>/`:

- `objects/<sha256>`: file contents, content-addressed (regular and LFS files alike),
- `commits/<commit id>.json`: parent, author, date, message and the full `{path: file}` manifest; the
  commit id is the sha1 of this JSON,
- `refs/<branch>`: the commit id at the head of the branch,
- `repo.json`: creation date and visibility,
- `tmp/`: staging area.

A commit stages its new blobs and checks every operation before it moves the branch with `os.replace`,
so it lands whole or not at all.
"""

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_BRANCH = "main"
_OTHER_REPO_TYPES = ("datasets", "spaces", "kernels")
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_COMMIT_ID_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK_SIZE = 1 << 20  # objects and request bodies are read in pieces of this size


class HubError(Exception):
    """An error answered to the client, with the Hub's `X-Error-Code` when the client relies on one."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _now() -> str:
    """Current UTC time in the Hub's format, e.g. `2024-05-01T12:00:00.000Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob, as `git hash-object` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file standing for a blob in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def check_path(path: Any) -> str:
    """Return `path` if it is a valid relative file path in a repository, else raise a 400."""
    if not isinstance(path, str) or any(part in ("", ".", "..", ".git") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repository: {path!r}")
    return path


def _atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write `data` to a temporary file in `tmp_dir`, then move it over `path` in one step."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Split an NDJSON commit payload into its header value and its `(key, value)` operations."""
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError as error:
        raise HubError(400, f"Commit payload is not NDJSON: {error}") from None
    if not lines or not all(isinstance(line, dict) and isinstance(line.get("value"), dict) for line in lines):
        raise HubError(400, "Each commit payload line must be an object with a `key` and a `value` object")
    if lines[0].get("key") != "header":
        raise HubError(400, "The first commit payload line must be the header")
    return lines[0]["value"], [(line.get("key"), line["value"]) for line in lines[1:]]


class Store:
    """The repositories under `root/models`, and the commit logic."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()

    def create_repo(self, namespace: str, name: str, private: bool) -> bool:
        """Create an empty repository; returns `False` if it already exists."""
        if not (_NAME_RE.fullmatch(namespace) and _NAME_RE.fullmatch(name)) or name.endswith(".git"):
            raise HubError(400, f"Invalid repository id: {namespace}/{name}")
        if namespace in _OTHER_REPO_TYPES:
            raise HubError(400, f"'{namespace}' cannot be used as a namespace")
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
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
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
        raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")

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
                raise HubError(400, f"Uploaded content does not match its sha256 {oid}")
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
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
                files = dict(self.files(repo, parent))
                for key, path, entry in changes:
                    self._apply(files, key, path, entry)
                folders = {
                    path.rsplit("/", depth)[0] for path in files for depth in range(1, path.count("/") + 1)
                }
                if clashes := sorted(folders & files.keys()):
                    raise HubError(400, f"{clashes[0]!r} cannot be both a file and a folder")
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
            path = check_path(value.get("path"))
            if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                raise HubError(400, f"The content of {path} must be a base64 string")
            try:
                data = base64.b64decode(value["content"], validate=True)
            except binascii.Error:
                raise HubError(400, f"Invalid base64 content for {path}") from None
            sha256 = hashlib.sha256(data).hexdigest()
            (staging / sha256).write_bytes(data)
            entry = {"sha256": sha256, "size": len(data), "lfs": False, "blobId": _git_blob_id(data)}
            return "add", path, entry
        if key == "lfsFile":
            path = check_path(value.get("path"))
            oid = value.get("oid")
            blob = repo / "objects" / str(oid)
            if (
                value.get("algo", "sha256") != "sha256"
                or not SHA256_RE.fullmatch(str(oid))
                or not blob.is_file()
            ):
                raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
            size = blob.stat().st_size
            if value.get("size", size) != size:
                raise HubError(400, f"LFS object {oid} for {path} has {size} bytes, not {value['size']}")
            entry = {
                "sha256": oid,
                "size": size,
                "lfs": True,
                "blobId": _git_blob_id(lfs_pointer(oid, size)),
            }
            return "add", path, entry
        if key in ("deletedFile", "deletedFolder"):
            path = value.get("path")
            return key, check_path(path.rstrip("/") if isinstance(path, str) else path), {}
        raise HubError(400, f"Unknown commit operation: {key!r}")

    @staticmethod
    def _apply(files: dict[str, dict[str, Any]], key: str, path: str, entry: dict[str, Any]) -> None:
        """Apply one staged operation to a manifest."""
        if key == "add":
            files[path] = entry
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        else:
            inside = [p for p in files if p.startswith(f"{path}/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for file_path in inside:
                del files[file_path]
