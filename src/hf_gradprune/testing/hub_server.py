"""The HTTP server of `LocalHub`: which endpoint answers a request, reading its body, checking its token,
and writing the answer or the error."""

import hmac
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .hub_reads import ReadEndpoints
from .hub_store import CHUNK_SIZE, DEFAULT_BRANCH, HubError, Store
from .hub_writes import Upload, WriteEndpoints

logger = logging.getLogger(__name__)


FAILURE_POINTS = ("commit", "lfs-upload")
"""Requests :meth:`LocalHub.drop_connection` can cut: the commit, and the upload of a large (LFS) file."""


class _Dropped(Exception):
    """The connection was dropped on purpose; no response is sent."""


class Server(ThreadingHTTPServer):
    """The HTTP server, holding what its request handlers share."""

    def __init__(self, address: tuple[str, int], store: Store, token: str, user: str) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.token = token
        self.user = user
        self.uploads: dict[str, Upload] = {}
        self.lock = threading.Lock()  # guards `uploads` and `failures`
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_POINTS, 0)


class _Handler(ReadEndpoints, WriteEndpoints, BaseHTTPRequestHandler):
    """Routes one request to the Hub endpoint it stands for, in :class:`ReadEndpoints` or
    :class:`WriteEndpoints`."""

    server: Server
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
                raise HubError(411, "Chunked request bodies are not supported, send a Content-Length")
            try:
                self._unread = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HubError(400, "Invalid Content-Length") from None
            self._route(method, [unquote(part) for part in url.path.split("/")[1:]])
        except HubError as error:
            self._discard_body()
            self._send_error(error)
        except _Dropped:
            logger.debug("Dropped the connection during %s %s on purpose", method, self.path)
        except ConnectionError:
            logger.debug("Client went away during %s %s", method, self.path)
        except Exception:
            logger.exception("LocalHub failed on %s %s", method, self.path)
            self._discard_body()
            self._send_error(HubError(500, "Internal error in LocalHub, see its log"))

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
                raise HubError(400, "LocalHub only serves model repositories")
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
                raise HubError(404, f"{method} {self.path} is not served by LocalHub")

    # Helpers, shared by the endpoints

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
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Path:
        """An existing repository the request may see: a private one only with the token (as the Hub,
        which answers "not found" rather than reveal that it exists)."""
        repo = self.server.store.repo(repo_id)
        if self.server.store.meta(repo)["private"] and not self._authorized():
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _iter_body(self) -> Iterator[bytes]:
        """The request body, chunk by chunk (each byte is read once)."""
        while self._unread:
            chunk = self.rfile.read(min(self._unread, CHUNK_SIZE))
            if not chunk:
                self._unread = 0
                raise HubError(400, "Request body is shorter than its Content-Length")
            self._unread -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict[str, Any]:
        try:
            payload = json.loads(self._body())
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise HubError(400, "Request body must be a JSON object")
        return payload

    def _discard_body(self) -> None:
        """Read what is left of the body, so that the client can read the response."""
        try:
            for _ in self._iter_body():
                pass
        except HubError:
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

    def _send_error(self, error: HubError) -> None:
        headers = {
            "X-Error-Message": error.message.encode("ascii", "backslashreplace").decode(),
            **error.headers,
        }
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, status=error.status, headers=headers)
