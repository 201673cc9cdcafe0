"""Push a saved pruned model to the Hub in one commit, so the push lands whole or not at all."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token

from .checkpoint import PARTIAL_PREFIX, PENDING_SAVE

logger = logging.getLogger(__name__)

DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth")
# Never uploaded, whatever `ignore_patterns` says (as in `huggingface_hub.upload_folder`), nor the
# temporary folders of a save in progress or cut short.
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
    """A model folder has ``config.json`` and safetensors weights among the files to push."""
    if not folder.is_dir():
        raise ValueError(
            f"`folder` {os.fspath(folder)!r} is not a folder: save the model first with "
            "`model.save_pretrained(folder)`."
        )
    top = [path for path in files if "/" not in path]
    missing = [
        what
        for what, present in (
            ("config.json", "config.json" in top),
            ("*.safetensors weights", any(path.endswith(".safetensors") for path in top)),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            f"`folder` {os.fspath(folder)!r} has no {' and no '.join(missing)} to push "
            f"(after `ignore_patterns`); its top-level files are {top}. Save the model with "
            "`model.save_pretrained(folder)`, which writes config.json and model.safetensors."
        )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload pruned model with hf_gradprune",
    revision: str | None = None,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
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
    token = token or get_token()
    if not token:
        raise ValueError(
            f"No Hugging Face token to push {repo_id!r} with: pass `--hub_token` (the `token` argument), "
            "set the `HF_TOKEN` environment variable, or run `hf auth login`. Nothing was created on the Hub."
        )
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in files]
    logger.info("Pushing %d files from %s to %s in one commit.", len(operations), folder, repo.repo_id)
    return api.create_commit(repo.repo_id, operations, commit_message=commit_message, revision=revision)
