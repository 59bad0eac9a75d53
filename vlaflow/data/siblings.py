"""What killed writers leave beside a store, said and cleaned: the hidden ``.NAME.tmp-PID-*`` and
``.NAME.old-PID-*`` siblings of :mod:`vlaflow.atomic`.

``info``, ``validate`` and ``collect`` report them (:func:`sibling_notes`); ``repair`` puts back a previous
store that an interrupted replacement left aside and removes the rest (:func:`clean_siblings`). A temp
store that holds finished episodes (a killed ``collect --overwrite``: the old store was kept, as it must be)
is kept unless asked, and its episodes are counted, so nothing finished is deleted without saying so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlaflow.atomic import restore_aside as _restore
from vlaflow.atomic import stale_leftovers
from vlaflow.data.store_checks import is_remote, local_path


def _episodes_in(path: Path) -> int | None:
    """Finished episodes of a leftover store (None if it is not a readable store)."""
    from vlaflow.data.store import EpisodeStore

    try:
        s = EpisodeStore.open(path, check=False)
        return s.n_episodes
    except Exception:  # a half-written temp directory is expected to be unreadable
        return None


def sibling_notes(store: str | os.PathLike) -> list[str]:
    """One line per stale leftover beside ``store`` (empty for a remote store or when there are none)."""
    if is_remote(store):
        return []
    dest = local_path(store).absolute()
    left = stale_leftovers(dest)
    out = []
    for p in left["tmp"]:
        n = _episodes_in(p)
        held = f" holding {n} finished episode(s)" if n else ""
        out.append(
            f"{p}: a temp store{held} left by a killed writer (the store at {dest.name} was not replaced); "
            f"`vlaflow repair {store}` removes it" + (" with --discard-leftovers" if n else "")
        )
    for p in left["old"]:
        if dest.exists():
            out.append(f"{p}: the old store, superseded by a finished replacement; repair removes it")
        else:
            out.append(
                f"{p}: the previous store, moved aside by a replacement killed before the new one arrived; "
                f"`vlaflow repair {store}` puts it back"
            )
    return out


def restore_aside(store: str | os.PathLike, *, dry_run: bool = False) -> Path | None:
    """:func:`vlaflow.atomic.restore_aside` for a store path (None for a remote store)."""
    return None if is_remote(store) else _restore(local_path(store).absolute(), dry_run=dry_run)


def clean_siblings(store: str | os.PathLike, *, discard: bool = False, dry_run: bool = False) -> list[str]:
    """Remove the stale leftovers beside an existing ``store``; a temp store with finished episodes only
    with ``discard``. Returns what was (or, with ``dry_run``, would be) done and what was kept."""
    if is_remote(store):
        return []
    dest = local_path(store).absolute()
    if not dest.exists():
        return []
    left = stale_leftovers(dest)
    done = []
    verb = "would remove" if dry_run else "removed"
    for p in left["tmp"] + left["old"]:
        n = _episodes_in(p) if p in left["tmp"] else None
        if n and not discard:
            done.append(f"kept {p}: a temp store with {n} finished episode(s) (--discard-leftovers)")
            continue
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True)
        done.append(f"{verb} {p} (left by a killed writer)")
    return done
