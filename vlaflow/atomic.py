"""Writing a directory so that a crash never leaves it half-written or loses the old one: one helper.

Every directory vlaflow writes whole (episode stores from ingest and collection, LeRobot exports, policy
checkpoints, ONNX exports, training checkpoints) goes through :func:`atomic_directory`::

    with atomic_directory(dest, overwrite=True) as tmp:   # tmp = DEST_PARENT/.NAME.tmp-XXXX
        write everything into tmp
    # now: the old dest (if any) was renamed to .NAME.old-XXXX, tmp renamed to dest, the old one deleted

The three steps of a replacement are renames on one file system, so at every instant either the old or the
new directory is complete: a kill between the two renames leaves the old one beside the missing ``dest``,
and :func:`recover_directory` renames it back. An error inside the block removes ``tmp`` and leaves
``dest`` as it was. Temp and old directories are hidden siblings named after ``dest``, so
:func:`leftovers` can report what a killed writer left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlaflow.errors import VlaflowError

TMP_TAG, OLD_TAG = ".tmp-", ".old-"


def temp_sibling(dest: str | os.PathLike) -> Path:
    """A new empty hidden directory beside ``dest`` (same file system, so it can be renamed onto it)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 would make every checkpoint and store unreadable to anyone else;
    # mkdir's mode follows the umask like any directory the user makes (the random name keeps it unique)
    tmp = dest.parent / f".{dest.name}{TMP_TAG}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def replace_directory(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the complete directory ``tmp`` to ``dest``, replacing an existing ``dest`` without a moment in
    which neither exists: old aside, new in, old deleted."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.with_name(f".{dest.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


@contextmanager
def atomic_directory(
    dest: str | os.PathLike, *, overwrite: bool = False, what: str = "destination"
) -> Iterator[Path]:
    """Yield a temp sibling of ``dest`` to write into; on success it replaces ``dest`` (see the module doc).

    An existing ``dest`` is an error unless ``overwrite`` (checked before any work is done, and again
    before the swap in case something appeared meanwhile).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise VlaflowError(f"{dest}: {what} exists (pass --overwrite to replace it)")
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if dest.exists() and not overwrite:
            raise VlaflowError(f"{dest}: {what} appeared while it was being written; nothing replaced")
        replace_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def leftovers(dest: str | os.PathLike) -> dict[str, list[Path]]:
    """Hidden temp and old siblings of ``dest`` that a killed writer left: {"tmp": [...], "old": [...]}."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return {"tmp": [], "old": []}
    return {
        "tmp": sorted(dest.parent.glob(f".{dest.name}{TMP_TAG}*")),
        "old": sorted(dest.parent.glob(f".{dest.name}{OLD_TAG}*"), key=lambda p: p.stat().st_mtime),
    }


def recover_directory(dest: str | os.PathLike) -> Path:
    """``dest`` itself, or -- after a kill between the two renames of a replacement -- the complete previous
    directory left beside it, renamed back into place. Half-written temp directories are removed.

    Only for a writer's own restart (e.g. resuming training): a temp directory may belong to another
    process that is still writing.
    """
    dest = Path(dest)
    left = leftovers(dest)
    for tmp in left["tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)
    olds = left["old"]
    if not dest.exists() and olds:
        os.replace(olds[-1], dest)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return dest
