"""Push a saved pruned model to the Hub in one commit, so the push lands whole or not at all."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import RevisionNotFoundError

from .saving import PARTIAL_PREFIX, PENDING_SAVE

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth")
# Never uploaded, whatever `ignore_patterns` says (as in `huggingface_hub.upload_folder`), nor the
# temporary folders of a save or a background push in progress or cut short.
ALWAYS_IGNORED = (".git/*", ".cache/huggingface/*", f"{PARTIAL_PREFIX}*", f"{PENDING_SAVE}/*")


def _is_ignored(path: str, patterns: Sequence[str]) -> bool:
    """Whether the relative posix ``path`` matches a pattern; a pattern ending in ``/`` matches a folder."""
    return any(
        fnmatch.fnmatch(path, pattern + "*" if pattern.endswith("/") else pattern) for pattern in patterns
    )


def _files_to_push(folder: Path, ignore_patterns: Sequence[str]) -> list[str]:
    """Relative posix paths of the files below ``folder`` that are not ignored, sorted."""
    if isinstance(ignore_patterns, str):
        raise TypeError(
            f"`ignore_patterns` must be a sequence of patterns, got the string {ignore_patterns!r}; "
            f"wrap it in a list: [{ignore_patterns!r}]."
        )
    patterns = [*ALWAYS_IGNORED, *ignore_patterns]
    files = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(path for path in files if not _is_ignored(path, patterns))


def _check_folder(folder: Path, files: list[str]) -> None:
    """A model folder has safetensors weights among the files to push (``config.json`` too, unless the model
    is a plain ``nn.Module``, whose folder has none)."""
    if not folder.is_dir():
        raise ValueError(
            f"`folder` {os.fspath(folder)!r} is not a folder: save the model first with "
            "`model.save_pretrained(folder)`."
        )
    top = [path for path in files if "/" not in path]
    if not any(path.endswith(".safetensors") for path in top):
        raise ValueError(
            f"`folder` {os.fspath(folder)!r} has no *.safetensors weights to push "
            f"(after `ignore_patterns`); its top-level files are {top}. Save the model with "
            "`model.save_pretrained(folder)` (config.json and model.safetensors), or "
            "`hf_gradprune.save_pruned(model, folder)` for any nn.Module."
        )


def _replaced(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` matches a pattern; a pattern without ``/`` matches files of the top folder only."""
    return any(fnmatch.fnmatch(path, p) and ("/" in p or "/" not in path) for p in patterns)


def _stale_files(
    api: HfApi, repo_id: str, revision: str | None, path_in_repo: str, patterns: Sequence[str], kept: set[str]
) -> list[str]:
    """Paths in the repository under ``path_in_repo`` that match ``patterns`` (relative to it) and are not in
    ``kept``: what a push that replaces them must delete."""
    if not patterns:
        return []
    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return []  # an empty repository, or a branch without commits yet
    prefix = f"{path_in_repo}/" if path_in_repo else ""
    return sorted(
        path
        for path in remote
        if path.startswith(prefix)
        and path not in kept
        and _replaced(path.removeprefix(prefix), patterns)
        and path != ".gitattributes"
    )


def staged_copy(
    source: str | os.PathLike, staging_root: str | os.PathLike, exclude: Sequence[str] = ()
) -> Path:
    """A snapshot of the files below ``source`` (but those matching ``exclude``) in a new temporary folder of
    ``staging_root``, for an upload that runs in the background while training goes on: hard links where
    the file system allows (a finished checkpoint's files are never rewritten in place, so a link keeps the
    bytes that were saved even when the checkpoint is rotated away), copies elsewhere. The folder is never
    pushed as part of ``staging_root`` (:data:`ALWAYS_IGNORED`); remove it when the upload is done (one left
    by a killed process goes at the next save into ``staging_root``).
    """
    source = Path(source)
    staged = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{PARTIAL_PREFIX}{os.getpid()}-push-"))
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if not path.is_file() or _is_ignored(relative.as_posix(), [*ALWAYS_IGNORED, *exclude]):
            continue
        target = staged / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return staged


def resolve_token(token: str | None, repo_id: str) -> str:
    """``token``, else huggingface_hub's (``HF_TOKEN`` or ``hf auth login``); none is an error that says how
    to give one."""
    token = token or get_token()
    if not token:
        raise ValueError(
            f"No Hugging Face token to push {repo_id!r} with: pass `--hub_token` (the `token` argument), "
            "set the `HF_TOKEN` environment variable, or run `hf auth login`. Nothing was created on the Hub."
        )
    return token


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload pruned model with hf_gradprune",
    revision: str | None = None,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    path_in_repo: str = "",
    delete_patterns: Sequence[str] = (),
) -> CommitInfo:
    """Upload a saved pruned model folder to a Hub repository in a single commit.

    The folder and the token are checked before anything is sent; then the repository is created if it
    does not exist and every file goes into one ``create_commit``, which the Hub applies whole or not at
    all (a half-uploaded model never appears on the branch). The endpoint is huggingface_hub's default
    (``HF_ENDPOINT``). Pickled files (``*.bin``, ``*.pt``, ``*.pth``), Trainer checkpoints and logs are
    left out by default.

    Args:
        folder (`str` or `os.PathLike`): a folder written by ``save_pretrained`` (``config.json`` and
            ``*.safetensors``), plus whatever should ship with it (``README.md``, heatmap, tokenizer, masks).
        repo_id (`str`): the repository, ``"user/name"`` or ``"name"`` (in the token owner's namespace).
        token (`str`, *optional*): a Hub token with write access; defaults to ``huggingface_hub.get_token()``
            (``HF_TOKEN`` or the token saved by ``hf auth login``).
        private (`bool`, *optional*): visibility of a newly created repository (the Hub's default if unset);
            an existing repository keeps its own.
        commit_message (`str`, *optional*, defaults to `"Upload pruned model with hf_gradprune"`): the
            commit title.
        revision (`str`, *optional*): an existing branch to commit to; defaults to the main branch.
        ignore_patterns (`Sequence[str]`, *optional*, defaults to `("checkpoint-*", "runs/*", "*.bin", "*.pt",
            "*.pth")`): ``fnmatch`` patterns matched against the file paths relative to ``folder`` (with
            ``/``); matching files are not uploaded. ``.git/`` and ``.cache/huggingface/`` never are.
        path_in_repo (`str`, *optional*, defaults to `""`): the repository folder the files go into (the
            ``Trainer`` pushes checkpoints to ``last-checkpoint``); the root by default.
        delete_patterns (`Sequence[str]`, *optional*, defaults to `()`): ``fnmatch`` patterns, relative to
            ``path_in_repo``, of files already in the repository that this push replaces: those it does not
            upload are deleted in the same commit (``["*"]`` makes ``path_in_repo`` the folder's exact copy;
            a masks file left over from an earlier push would otherwise be applied to weights it does not
            belong to).

    Returns:
        `huggingface_hub.CommitInfo`: the commit, with ``oid`` (its sha) and ``commit_url``.

    Raises:
        ValueError: ``folder`` is not a model folder, or no token is available.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_gradprune import prune_heads
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37, vocab_size=99))
        >>> _ = prune_heads(model, {0: [1]})
        >>> model.save_pretrained("bert-pruned")  # doctest: +SKIP
        >>> info = push_folder_to_hub("bert-pruned", "user/bert-pruned")  # doctest: +SKIP
        >>> info.oid  # doctest: +SKIP
        '3f5c...'
    """
    folder = Path(folder)
    files = _files_to_push(folder, ignore_patterns) if folder.is_dir() else []
    _check_folder(folder, files)
    if isinstance(delete_patterns, str):
        raise TypeError(
            f"`delete_patterns` must be a sequence of patterns, got the string {delete_patterns!r}; "
            f"wrap it in a list: [{delete_patterns!r}]."
        )
    path_in_repo = path_in_repo.strip("/")
    api = HfApi(token=resolve_token(token, repo_id))
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    remote = {path: f"{path_in_repo}/{path}" if path_in_repo else path for path in files}
    stale = _stale_files(api, repo.repo_id, revision, path_in_repo, delete_patterns, set(remote.values()))
    operations = [
        *(CommitOperationDelete(path_in_repo=path) for path in stale),
        *(CommitOperationAdd(path_in_repo=remote[path], path_or_fileobj=folder / path) for path in files),
    ]
    logger.info("Pushing %d files from %s to %s in one commit.", len(files), folder, repo.repo_id)
    return api.create_commit(repo.repo_id, operations, commit_message=commit_message, revision=revision)
