"""A local server speaking enough of the Hugging Face Hub HTTP protocol for the real `huggingface_hub` client.

Point `HF_ENDPOINT` at `LocalHub.endpoint` and set `HF_HUB_DISABLE_XET=1` (this server has no Xet storage)
*before* `huggingface_hub` is imported: the client reads both when it is imported. Then `create_repo`,
`upload_folder`, `create_commit` (regular and LFS files, file and folder deletions), `model_info`,
`list_repo_files`, `list_repo_tree`, `list_repo_commits`, `list_repo_refs`, `get_paths_info`,
`hf_hub_download` and `snapshot_download` (at a branch or at a full commit sha) work offline.

Only model repositories are served, and new repositories start empty (the real Hub makes a first
`.gitattributes` commit). Reads need no token; every write needs the token the server was started with.

Repositories are stored under `root/models/<namespace>/<name>/`, and a commit lands whole or not at all
(`hub_store`). The HTTP server is `hub_server`, its endpoints `hub_reads` and `hub_writes`.

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
import os
import signal
import threading
from pathlib import Path

from .hub_server import FAILURE_POINTS, Server
from .hub_store import Store


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
        self._server: Server | None = None
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
        self._server = Server((self.host, self.port), Store(self.root), self.token, self.user)
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
