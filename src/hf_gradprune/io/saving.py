"""Saves that are whole or not at all: files written into a temporary folder and moved into place, and a
save killed while moving completed by the next reader."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".saving-"
PENDING_SAVE = ".pending-save"
"""A complete new set of files being moved into a folder; its presence means that move was cut short."""


def finish_interrupted_save(folder: str | os.PathLike) -> bool:
    """Complete a save into ``folder`` that was killed while moving its files into place.

    :func:`saving_into` writes every file into a temporary folder, renames it to ``.pending-save`` (one
    atomic step: from then on the new set is whole) and moves its files into ``folder``. A process killed
    before the rename leaves the previous files untouched; one killed during the moves leaves the rest in
    ``.pending-save``, and this moves them. Stale temporary folders of dead processes are removed.

    Returns:
        `bool`: whether an interrupted save was completed.
    """
    folder = Path(folder)
    for partial in folder.glob(f"{PARTIAL_PREFIX}*"):
        pid = partial.name.removeprefix(PARTIAL_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
    pending = folder / PENDING_SAVE
    if not pending.is_dir():
        return False
    logger.warning("Completing an interrupted save in %s (files left in %s).", folder, PENDING_SAVE)
    _move_files(pending, folder)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_files(source: Path, folder: Path) -> None:
    """Move every file below ``source`` to the same place below ``folder`` (``os.replace``), then drop it."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(source)


@contextlib.contextmanager
def saving_into(folder: str | os.PathLike, owned: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder to write a save into; on success its files replace those of ``folder``.

    The other files of ``folder`` stay, but for those named in ``owned`` (files this kind of save answers
    for, such as the masks file): one the save does not write is an earlier save's, and is removed. A
    process killed while writing leaves ``folder`` as it was; one
    killed while the files move is completed by :func:`finish_interrupted_save` (``load_pruned``, the
    next save and resuming call it). An exception removes the temporary folder and leaves ``folder`` as it
    was.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with saving_into(folder) as partial:
        ...         _ = (partial / "config.json").write_text("{}")
        ...     sorted(p.name for p in Path(folder).iterdir())
        ['config.json']
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)
    partial = Path(tempfile.mkdtemp(dir=folder, prefix=f"{PARTIAL_PREFIX}{os.getpid()}-"))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pending = folder / PENDING_SAVE
    os.replace(partial, pending)
    written = {path.relative_to(pending).as_posix() for path in pending.rglob("*") if path.is_file()}
    _move_files(pending, folder)
    for name in set(owned) - written:
        (folder / name).unlink(missing_ok=True)
