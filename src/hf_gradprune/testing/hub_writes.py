"""The endpoints of `LocalHub` that write: repository creation, the preupload check, LFS uploads (the batch
API, then the upload itself) and the commit. Every write needs the server's token."""

import base64
import binascii
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub_store import SHA256_RE, HubError, check_path

# Files larger than this, binary files (NUL byte in the first 512 bytes) and files with these suffixes
# (those of the Hub's default `.gitattributes`, plus images and GGUF) are uploaded through LFS.
LFS_SIZE_THRESHOLD = 1_000_000
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gif", ".gz", ".h5", ".jpeg", ".jpg",
    ".joblib", ".mlmodel", ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb",
    ".pickle", ".pkl", ".png", ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm",
    ".webp", ".xz", ".zip", ".zst",
)  # fmt: skip


@dataclass(frozen=True)
class Upload:
    """An LFS upload announced through the batch API, waiting for its PUT."""

    repo: Path
    oid: str
    size: int


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub would ask for this file to be uploaded through LFS."""
    return size > LFS_SIZE_THRESHOLD or b"\0" in sample or path.lower().endswith(LFS_SUFFIXES)


class WriteEndpoints:
    """The request handler's writes: each needs the server's token (the upload URL stands for it)."""

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._json_body()
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, f"LocalHub only serves model repositories, not {payload['type']!r} ones")
        namespace = str(payload.get("organization") or self.server.user)
        name = str(payload.get("name"))
        url = f"{self._endpoint}/{namespace}/{name}"
        if self.server.store.create_repo(namespace, name, private=payload.get("visibility") == "private"):
            self._send_json({"url": url, "name": f"{namespace}/{name}"})
        else:
            message = "You already created this model repo"
            self._send_json({"error": message, "url": url}, status=409, headers={"X-Error-Message": message})

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        store = self.server.store
        repo = self._repo(repo_id)
        existing = store.files(repo, store.branch_head(repo, revision))
        answers = []
        for file in self._json_body().get("files", []):
            path = check_path(file.get("path"))
            try:
                sample = base64.b64decode(file.get("sample", ""), validate=True)
            except binascii.Error:
                raise HubError(400, f"Invalid base64 sample for {path}") from None
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
            raise HubError(400, "LocalHub does not support pull requests")
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
            raise HubError(400, "LocalHub only supports the LFS `upload` operation")
        answers = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            answer: dict[str, Any] = {"oid": str(oid), "size": size if isinstance(size, int) else -1}
            if not (SHA256_RE.fullmatch(str(oid)) and isinstance(size, int) and size >= 0):
                answer["error"] = {"code": 422, "message": "Invalid oid or size"}
            elif not (repo / "objects" / oid).is_file():
                # Like the Hub's pre-signed storage URLs, the upload URL is the credential: the client PUTs
                # to it without a token, and it stays valid until the upload succeeds.
                upload_id = secrets.token_hex(16)
                with self.server.lock:
                    self.server.uploads[upload_id] = Upload(repo, oid, size)
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
            raise HubError(404, "Unknown or already used upload URL")
        if self._unread != upload.size:
            raise HubError(400, f"Expected {upload.size} bytes, got a Content-Length of {self._unread}")
        self._maybe_drop("lfs-upload")
        self.server.store.put_object(upload.repo, upload.oid, self._iter_body())
        with self.server.lock:
            self.server.uploads.pop(upload_id, None)
        self._send_headers(200, 0, {})
