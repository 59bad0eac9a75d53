"""The writer lock: real concurrent appender processes, real SIGKILLs, the stale-lock rule."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_store import KEYS

from vlaflow.data.lock import LOCK_NAME, read_lock
from vlaflow.data.store import EpisodeStore, atomic_store
from vlaflow.errors import StoreError

TESTS_DIR = os.path.dirname(__file__)
PER_WRITER = 9


def writer_episode(w: int, j: int) -> dict[str, np.ndarray]:
    """Content that names its writer w and its number j in every value."""
    n = 30 + (w * 17 + j * 11) % 40
    base = np.float32(w * 100_000 + j * 1000)
    t = np.arange(n, dtype=np.float32)[:, None]
    return {
        "action": base + t + np.zeros((n, 3), np.float32),
        "obs.state": -(base + t) + np.zeros((n, 4), np.float32),
        "obs.image.front": np.full((n, 16, 16, 3), w * PER_WRITER + j, np.uint8),
    }


APPENDER = r"""
import sys, time, os
sys.path.insert(0, sys.argv[3])
from test_store_lock import writer_episode, PER_WRITER
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import StoreError
path, w, go = sys.argv[1], int(sys.argv[2]), sys.argv[4]
try:
    s = EpisodeStore.open(path, mode="a")
except StoreError as e:
    print("REFUSED", str(e).replace("\n", " "), flush=True)
    sys.exit(3)
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
for j in range(PER_WRITER):
    s.append_episode(writer_episode(w, j), task=f"w{w}")
print("DONE", flush=True)
"""


def identify(ep: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(writer, number) of a stored episode whose every value agrees with that writer's episode, else None."""
    base = float(ep["action"][0, 0])
    w, j = int(base // 100_000), int(base % 100_000 // 1000)
    if not (0 <= w <= 1 and 0 <= j < PER_WRITER):
        return None
    want = writer_episode(w, j)
    same = all(ep[k].shape == want[k].shape and np.array_equal(ep[k], want[k]) for k in want)
    return (w, j) if same else None


def test_two_appenders_on_one_store_the_second_is_refused(tmp_path):
    """Was: both appenders opened the store, interleaved, and several episodes got the wrong content."""
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(path), str(w), TESTS_DIR, str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in (0, 1)
    ]
    first = [p.stdout.readline() for p in procs]
    go.touch()  # both that opened start appending at once
    outs = [first[i] + p.communicate(timeout=120)[0] for i, p in enumerate(procs)]
    s = EpisodeStore.open(path)
    found = [identify(s.get_episode(i)) for i in range(s.n_episodes)]
    wrong = [i for i, f in enumerate(found) if f is None]
    assert wrong == [], f"{len(wrong)} of {s.n_episodes} episodes have the wrong content: {wrong}"
    refused = [o for o in outs if o.startswith("REFUSED")]
    assert len(refused) == 1, outs
    winner = 1 if outs[0].startswith("REFUSED") else 0
    assert found == [(winner, j) for j in range(PER_WRITER)]
    msg = refused[0]
    assert "another writer" in msg and f"pid {procs[winner].pid}" in msg and socket.gethostname() in msg
    assert "test_store_lock" in msg or "-c" in msg  # the holder's command line
    assert not (path / LOCK_NAME).exists()  # released at the winner's exit


HOLDER = r"""
import sys, time
from vlaflow.data.store import EpisodeStore
s = EpisodeStore.open(sys.argv[1], mode="a")
print("HELD", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(600)
"""


def test_sigkilled_writer_leaves_a_stale_lock_that_the_next_writer_takes_over(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "sleep"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "HELD"
    held = read_lock(path)
    assert held["pid"] == proc.pid and held["host"] == socket.gethostname() and "command" in held
    with pytest.raises(StoreError, match=rf"another writer.*pid {proc.pid}"):
        EpisodeStore.open(path, mode="a")
    assert EpisodeStore.open(path).n_episodes == 0  # readers are never blocked
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert read_lock(path)["pid"] == proc.pid  # a SIGKILL cannot clean up
    with pytest.warns(UserWarning, match=rf"stale writer lock.*pid {proc.pid}.*no longer running"):
        s = EpisodeStore.open(path, mode="a")
    assert read_lock(path)["pid"] == os.getpid()
    s.close()
    assert not (path / LOCK_NAME).exists()


def test_lock_is_released_at_normal_interpreter_exit_without_close(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    out = subprocess.run(
        [sys.executable, "-c", HOLDER, str(path), "exit"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "HELD" in out.stdout, out.stderr
    assert not (path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    lock = {
        "pid": 1,
        "host": "some-other-host",
        "started": "2026-01-01T00:00:00",
        "command": "vlaflow collect",
    }
    (path / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(StoreError, match=r"pid 1 on host some-other-host.*vlaflow collect.*delete .*lock"):
        EpisodeStore.open(path, mode="a")
    assert json.loads((path / LOCK_NAME).read_text()) == lock


def test_create_close_context_manager_and_one_process_holding_two_handles(tmp_path):
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, KEYS, fps=10) as s:
        assert read_lock(path)["pid"] == os.getpid()
        again = EpisodeStore.open(path, mode="a")  # the lock is between processes, not handles
        again.close()
        assert (path / LOCK_NAME).exists()  # still held by `s`
    assert not (path / LOCK_NAME).exists()
    s.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        s.append_episode({k: np.zeros((1, *v.shape), v.dtype) for k, v in KEYS.items()})
    # the lock file does not disturb zarr or readers
    r = EpisodeStore.open(path)
    assert sorted(k for k, _ in r.root["data"].arrays()) == sorted(KEYS)


def test_atomic_store_will_not_replace_a_store_another_process_is_writing(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "sleep"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "HELD"
        with pytest.raises(StoreError, match=rf"another writer.*pid {proc.pid}"):
            with atomic_store(path, KEYS, fps=10, overwrite=True):
                pass
        assert EpisodeStore.open(path).n_episodes == 0 and read_lock(path)["pid"] == proc.pid
        with pytest.raises(StoreError, match=rf"another writer.*pid {proc.pid}"):
            EpisodeStore.create(path, KEYS, fps=10, overwrite=True)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with atomic_store(path, KEYS, fps=10, overwrite=True) as s:  # the killed holder's lock is stale
        assert read_lock(s.path)["pid"] == os.getpid()
    assert not (path / LOCK_NAME).exists()


def _child_appends(path: str, q) -> None:
    try:
        EpisodeStore.open(path, mode="a")
        q.put("opened")
    except StoreError as e:
        q.put(f"refused: {e}")


def test_a_forked_child_does_not_inherit_its_parents_lock(tmp_path):
    import multiprocessing as mp

    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, KEYS, fps=10):
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        child = ctx.Process(target=_child_appends, args=(str(path), q))
        child.start()
        answer = q.get(timeout=60)
        child.join(timeout=60)
        assert answer.startswith("refused") and f"pid {os.getpid()}" in answer
        assert read_lock(path)["pid"] == os.getpid()  # the child's exit did not release it
    assert not (path / LOCK_NAME).exists()


def test_a_reused_pid_or_a_half_written_lock_is_stale(tmp_path):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path, KEYS, fps=10).close()
    # the recorded pid is alive (it is ours) but the kernel says it started at another time: pid reuse
    lock = {"pid": os.getppid(), "host": socket.gethostname(), "command": "old", "proc_start": "1"}
    (path / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.warns(UserWarning, match="now belongs to another process"):
        EpisodeStore.open(path, mode="a").close()
    # a writer killed between creating the lock file and writing it leaves an empty file
    (path / LOCK_NAME).write_text("")
    with pytest.raises(StoreError, match="still being written"):
        EpisodeStore.open(path, mode="a")
    old = time.time() - 60
    os.utime(path / LOCK_NAME, (old, old))
    with pytest.warns(UserWarning, match="unreadable lock file"):
        EpisodeStore.open(path, mode="a").close()
    assert not (path / LOCK_NAME).exists()
