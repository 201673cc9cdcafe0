"""The endpoints of `LocalHub` that read: who the token belongs to, a repository's info, tree, files' info,
commits and branches, and its files themselves (whole or a byte range)."""

import hashlib
import re
from typing import Any
from urllib.parse import parse_qs

from .hub_store import CHUNK_SIZE, HubError, lfs_pointer

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def _file_item(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it."""
    item: dict[str, Any] = {"type": "file", "oid": entry["blobId"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
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
        raise HubError(404, f"Folder not found: {folder}", "EntryNotFound")
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
    raise HubError(416, f"Cannot serve range {header!r}", headers={"Content-Range": f"bytes */{size}"})


class ReadEndpoints:
    """The request handler's reads: they need no token, but for `whoami` and a private repository."""

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
                    pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
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

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        repo = self._repo(repo_id)
        commit_id = store.resolve(repo, revision)
        headers = {"X-Repo-Commit": commit_id} if commit_id else {}
        entry = store.files(repo, commit_id).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
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
                    chunk = file.read(min(remaining, CHUNK_SIZE))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
