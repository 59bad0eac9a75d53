"""One writer at a time per episode store: a lock file inside the store.

Why: two appenders on one store both read the same episode count, write their steps over each other and
commit each other's ``episode_ends``; episodes silently get the wrong content. Every writable handle
(``EpisodeStore.create``, ``EpisodeStore.open(mode="a")``, ``atomic_store``, ``repair``) therefore takes
``<store>/.vlaflow-writer.lock`` first and releases it on ``close()``, at the end of a ``with`` block, when
the handle is garbage-collected, and at normal interpreter exit.

The rules:

- The lock file is created atomically (written under a unique name, then hard-linked into place) and
  holds JSON: pid, host, the holder's start time, its command line, and (on Linux) the kernel's start
  time of the process, so a reused pid is not mistaken for the holder.
- A second writer gets a :class:`~vlaflow.errors.StoreError` naming the holder. Readers are never blocked.
- A lock whose holder is gone -- same host, and that pid is no longer running (or is a zombie, or is now
  a different process) -- is stale: a SIGKILLed writer cannot clean up, so the next writer takes it over
  with a warning. A lock from another host is never judged stale (we cannot see its processes); the error
  says which file to delete once that writer is known to be gone. Two writers taking over one stale lock
  at once are serialised with ``flock`` on the store directory, so exactly one wins.
- The lock is between processes. One process may hold several writable handles on one store (the lock is
  counted); it must not use them from concurrent threads. A forked child does not inherit the lock.

What is not locked: stores at remote fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...). Object stores
offer no portable create-if-absent, so a second writer there is not detected; write a remote store from
one process only (``file://`` URLs are local paths and are locked).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from vlaflow.errors import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: takeovers are not serialised there
    fcntl = None

LOCK_NAME = ".vlaflow-writer.lock"
_HALF_WRITTEN_GRACE_S = 10.0  # an unreadable lock younger than this may be being written right now


def lock_path(store_dir: str | os.PathLike) -> Path:
    return Path(store_dir) / LOCK_NAME


def read_lock(store_dir: str | os.PathLike) -> dict | None:
    """The holder recorded in a store's lock file; None when unlocked, {} when unreadable."""
    try:
        text = lock_path(store_dir).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return _proc_state(pid) != "Z"  # a killed but unreaped writer is gone


def stale_reason(info: dict, lock_file: Path) -> str | None:
    """Why the holder in ``info`` is gone, or None if it may still be writing."""
    if not info:
        age = time.time() - lock_file.stat().st_mtime
        return (
            f"unreadable lock file {age:.0f} s old (a writer killed while taking it)"
            if (age > _HALF_WRITTEN_GRACE_S)
            else None
        )
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return f"pid {pid} is no longer running"
    recorded, now = info.get("proc_start"), _proc_start(pid)
    if recorded is not None and now is not None and recorded != now:
        return f"pid {pid} is no longer running (the pid now belongs to another process)"
    return None


def describe(info: dict) -> str:
    if not info:
        return "a writer whose lock file is still being written or is unreadable"
    return (
        f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('started')}, "
        f"command: {info.get('command')}"
    )


def _try_create(path: Path, info: dict) -> bool:
    """Create the lock file with its content in one step: written and synced under a unique name, then
    hard-linked into place (``link`` fails if the lock exists), so no reader ever sees a half-written lock
    (a second writer racing the first would otherwise read an empty file and could not name the holder)."""
    tmp = path.with_name(f"{path.name}.{info['token']}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:  # a read-only directory or file system: no writer can work here
        raise StoreError(f"{path.parent}: cannot create the writer lock {path.name} ({e.strerror})") from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write (short window)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _takeover_guard(store_dir: Path):
    """Serialise stale-lock takeovers (flock on the directory; a no-op where flock does not exist)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(store_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@dataclass
class _ProcessLock:
    """The lock file this process holds on one store, shared by its handles."""

    path: Path
    info: dict
    count: int = 0


_HELD: dict[str, _ProcessLock] = {}


@dataclass
class LockHandle:
    """One writable handle's share of the process's lock; ``release`` is idempotent."""

    key: str
    pid: int = field(default_factory=os.getpid)
    released: bool = False

    def release(self) -> None:
        if self.released or os.getpid() != self.pid:  # a forked child never releases its parent's lock
            return
        self.released = True
        held = _HELD.get(self.key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[self.key]
        if (read_lock(held.path.parent) or {}).get("token") == held.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                held.path.unlink()


def acquire(store_dir: str | os.PathLike, what: str = "store") -> LockHandle:
    """Take the writer lock of the local store directory ``store_dir`` (which must exist)."""
    store_dir = Path(store_dir).resolve()  # one key per directory, however it is named
    path = store_dir / LOCK_NAME
    key = str(path)
    held = _HELD.get(key)
    if held is not None and held.info["pid"] == os.getpid():  # a forked child's copy is its parent's
        held.count += 1
        return LockHandle(key)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_at": time.time(),
        "command": shlex.join(sys.argv)[:500] if sys.argv else sys.executable,
        "proc_start": _proc_start(os.getpid()),
        "token": uuid.uuid4().hex,
    }
    for _ in range(5):
        if _try_create(path, info):
            _HELD[key] = _ProcessLock(path, info, count=1)
            return LockHandle(key)
        holder = read_lock(store_dir)
        if holder is None:  # released between our attempt and the read: try again
            continue
        reason = stale_reason(holder, path)
        if reason is None:
            raise StoreError(
                f"{store_dir}: another writer holds this {what} ({describe(holder)}). Wait for it to finish; "
                f"if you are sure that process is gone, delete {path}"
            )
        with _takeover_guard(store_dir):
            if read_lock(store_dir) != holder:  # someone else took it over first: look again
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if _try_create(path, info):
                warnings.warn(
                    f"{store_dir}: taking over a stale writer lock ({describe(holder)}): {reason}; its "
                    "unfinished tail, if any, is ignored by readers and trimmed by `vlaflow repair`",
                    UserWarning,
                    stacklevel=3,
                )
                _HELD[key] = _ProcessLock(path, info, count=1)
                return LockHandle(key)
    raise StoreError(f"{store_dir}: could not take the writer lock {path}: it keeps changing hands")
