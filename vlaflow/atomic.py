"""Writing a directory so that a crash never leaves it half-written or loses the old one: one helper.

Every directory vlaflow writes whole (episode stores from ingest and collection, LeRobot exports, policy
checkpoints, ONNX exports, training checkpoints) goes through :func:`atomic_directory`::

    with atomic_directory(dest, overwrite=True) as tmp:   # tmp = DEST_PARENT/.NAME.tmp-XXXX
        write everything into tmp
    # now: the old dest (if any) was renamed to .NAME.old-XXXX, tmp renamed to dest, the old one deleted

The three steps of a replacement are renames on one file system, so at every instant either the old or the
new directory is complete: a kill between the two renames leaves the old one beside the missing ``dest``,
and :func:`restore_aside` renames it back (every later write to ``dest`` calls it first, and so does
``vlaflow repair``; :func:`recover_directory` is the same for a writer resuming its own work). An error
inside the block removes ``tmp`` and leaves ``dest`` as it was. Temp and old directories are hidden
siblings named after ``dest`` and the writer's process id (``.NAME.tmp-PID-XXXX``, ``.NAME.old-PID-XXXX``),
so :func:`leftovers` can report what a killed writer left behind and :func:`stale` can tell it from a
directory a live writer is still filling.

The overwrite rule every command that writes a directory follows is :func:`check_destination`: an existing
destination is refused without ``--overwrite``, and a destination that is, contains or lies inside one of
the command's sources is refused always (a command never writes into what it reads). Commands whose outputs
record their own paths (an evaluation report naming its videos) write in place through
:func:`fresh_directory`, which keeps the old directory aside until the new one is done.

Crash tests pause a writer at a named point of a replacement with ``VLAFLOW_TEST_PAUSE=POINT:MARKER`` (it
writes its pid to the file MARKER and sleeps, so the test can SIGKILL it exactly there); the points are
``written`` (new directory complete, nothing renamed), ``aside`` (old renamed aside, new not yet in) and
``swapped`` (new in place, old not yet deleted); the episode store adds ``append`` (an episode's data and
metadata written, its ``episode_ends`` entry not yet).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlaflow.errors import VlaflowError

TMP_TAG, OLD_TAG = ".tmp-", ".old-"
# the --overwrite help of every command that writes a directory (one rule: check_destination)
OVERWRITE_HELP = (
    "replace an existing destination; the old one is kept until the new one is complete (a kill leaves "
    "one of them whole). Never allowed onto or into one of the command's own inputs"
)
PAUSE_ENV = "VLAFLOW_TEST_PAUSE"


_pause_hits: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Crash-test hook (see the module doc): with ``VLAFLOW_TEST_PAUSE=name:MARKER`` (or ``name@N:MARKER``,
    the N-th time the point is reached) set, write our pid to MARKER and sleep until killed. Costs one
    environment lookup otherwise."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")[0].partition("@")
    if point != name:
        return
    _pause_hits[name] = _pause_hits.get(name, 0) + 1
    if _pause_hits[name] < int(nth or 1):
        return
    Path(spec.partition(":")[2]).write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


def temp_sibling(dest: str | os.PathLike) -> Path:
    """A new empty hidden directory beside ``dest`` (same file system, so it can be renamed onto it)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 would make every checkpoint and store unreadable to anyone else;
    # mkdir's mode follows the umask like any directory the user makes. The pid tells a live writer's
    # temp directory from a killed one's (writer_pid); the random part keeps the name unique.
    tmp = dest.parent / f".{dest.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def replace_directory(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the complete directory ``tmp`` to ``dest``, replacing an existing ``dest`` without a moment in
    which neither exists: old aside, new in, old deleted."""
    tmp, dest = Path(tmp), Path(dest)
    pause_point("written")
    if dest.exists():
        old = dest.with_name(f".{dest.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.replace(dest, old)
        pause_point("aside")
        os.replace(tmp, dest)
        pause_point("swapped")
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
    before the swap in case something appeared meanwhile). A previous ``dest`` that a killed replacement
    left aside is put back first (:func:`restore_aside`), so it is what the rule and the swap see.
    """
    dest = Path(dest)
    restore_aside(dest)
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


def writer_pid(leftover: str | os.PathLike) -> int | None:
    """The process id in a temp / old sibling's name (None for names from before pids were recorded)."""
    name = Path(leftover).name
    for tag in (TMP_TAG, OLD_TAG):
        if tag in name:
            head = name.rsplit(tag, 1)[1].split("-", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def stale(leftover: str | os.PathLike) -> bool:
    """True when the process that made ``leftover`` is gone (a killed writer's), False while it runs.

    A name without a pid counts as stale. Process ids are reused, so a long-dead writer's leftover can look
    live until that pid is free again; it is then only reported, never removed, which is the safe side.
    """
    pid = writer_pid(leftover)
    if pid is None:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_leftovers(dest: str | os.PathLike) -> dict[str, list[Path]]:
    """:func:`leftovers` whose writers are gone: safe to report as abandoned and to clean."""
    return {k: [p for p in v if stale(p)] for k, v in leftovers(dest).items()}


def restore_aside(dest: str | os.PathLike, *, dry_run: bool = False) -> Path | None:
    """After a kill between the two renames of a replacement (``dest`` missing, its previous version
    complete at ``.NAME.old-PID-*``, the writer gone): rename that previous version back to ``dest``.
    Returns where it came from, or None when there was nothing to put back."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        return None
    olds = stale_leftovers(dest)["old"]
    if not olds:
        return None
    if not dry_run:
        os.replace(olds[-1], dest)
    return olds[-1]


def aside_hint(dest: str | os.PathLike) -> str:
    """For a missing ``dest``: where a killed replacement left its previous version, and the way back
    (to append to a "no such ..." message; empty when there is none, or for a URL)."""
    if "://" in str(dest) and not str(dest).startswith("file://"):
        return ""
    local = Path(str(dest).removeprefix("file://")).absolute()
    aside = stale_leftovers(local)["old"]
    if not aside:
        return ""
    return f"; a killed replacement left the old one at {aside[-1]}: `vlaflow repair {dest}` restores it"


def recover_directory(dest: str | os.PathLike) -> Path:
    """``dest`` itself, or -- after a kill between the two renames of a replacement -- the complete previous
    directory left beside it, renamed back into place. Stale temp directories (their writer is gone) are
    removed; those of a live writer are left alone.
    """
    dest = Path(dest)
    left = stale_leftovers(dest)
    for tmp in left["tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)
    olds = left["old"]
    if not dest.exists() and olds:
        os.replace(olds[-1], dest)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_destination(
    dest: str | os.PathLike,
    *,
    overwrite: bool,
    sources: dict[str, str | os.PathLike | None] | None = None,
    what: str = "output directory",
    flag: str = "--out",
    exists_ok: bool = False,
    remedy: str | None = None,
) -> Path:
    """The one overwrite rule for a command that writes a directory, checked before any work.

    - ``dest`` that is, contains or lies inside one of ``sources`` (name -> path, e.g. ``{"--teacher":
      ckpt}``) is refused, with or without ``--overwrite``: the command would replace or write into what
      it reads.
    - An existing ``dest`` is refused unless ``overwrite`` (or ``exists_ok``, for a command that has its
      own rule for an existing destination, such as ``train --resume`` or appending ``teleop``). Even an
      empty directory counts: a typo in ``--out`` should not quietly reuse an unrelated directory.

    ``remedy`` replaces the "(pass --overwrite ...)" advice for a command without that flag.
    Returns ``dest`` as given. URLs (``scheme://``) are not checked here; their writers check them.
    """
    if "://" in str(dest):
        return Path(dest)
    dest = Path(dest)
    restore_aside(dest)  # a killed replacement's previous version counts as the existing destination
    real = dest.resolve()
    for name, src in (sources or {}).items():
        if src is None or "://" in str(src) or not Path(src).exists():
            continue
        rel = _relation(real, Path(src).resolve())
        if rel is not None:
            raise VlaflowError(
                f"{flag} {dest} {rel} {name} {src}: a command never writes into what it reads "
                f"(--overwrite does not change that); choose another {flag}"
            )
    if (dest.exists() or dest.is_symlink()) and not (overwrite or exists_ok):
        raise VlaflowError(
            f"{dest}: {what} exists ({remedy or f'pass --overwrite to replace it, or choose another {flag}'})"
        )
    return dest


@contextmanager
def fresh_directory(
    dest: str | os.PathLike,
    *,
    overwrite: bool,
    sources: dict[str, str | os.PathLike | None] | None = None,
    what: str = "output directory",
    flag: str = "--out",
) -> Iterator[Path]:
    """A new empty ``dest`` to write in place, for commands whose outputs record their own paths (an
    evaluation report naming its videos, the demo's run recording its store) and so cannot be written
    elsewhere and renamed. :func:`check_destination` first; an existing ``dest`` (with ``overwrite``) is
    renamed aside, not deleted: success deletes it, an error removes the partial new one and puts it back
    (with no previous one, the partial output stays, for a look at what failed), and a kill leaves it
    complete beside ``dest`` (a ``.NAME.old-PID-*`` sibling, removed by the next
    successful run).
    """
    dest = check_destination(dest, overwrite=overwrite, sources=sources, what=what, flag=flag)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.replace(dest, old)
    try:
        dest.mkdir(parents=True)
        yield dest
    except BaseException:
        if old is not None:  # the previous output comes back; with none, the partial one stays to look at
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(old, dest)
        raise
    for p in [old, *stale_leftovers(dest)["old"], *stale_leftovers(dest)["tmp"]]:
        if p is not None:
            shutil.rmtree(p, ignore_errors=True)
