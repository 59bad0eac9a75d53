"""``--overwrite`` is atomic (issue 12, defect 2): real ``vlaflow ingest --overwrite`` and ``vlaflow
export-lerobot --overwrite`` processes SIGKILLed at every point of a replacement -- while the new directory
is written, when it is complete, after the old one went aside, after the new one went in. At every point
either the old destination is whole (byte for byte) or the new one is complete; never a half-deleted one.
Where the kill fell between the two renames, ``info`` names the previous store and ``repair`` (or the next
write) puts it back.

The kill points are reached with the crash-test hook of :mod:`vlaflow.atomic` (``VLAFLOW_TEST_PAUSE``): the
writer reports its pid at the point and sleeps, and the test kills it there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store_damage import digest

from vlaflow.atomic import PAUSE_ENV, leftovers
from vlaflow.data.store import EpisodeStore
from vlaflow.data.validate import validate_store

REPO = Path(__file__).resolve().parents[1]


def dp_source(path: Path, n_eps: int, length: int = 40, offset: float = 0.0) -> Path:
    """A diffusion_policy v2 zarr (what `vlaflow ingest` reads) of ``n_eps`` episodes."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    n = n_eps * length
    a = (np.arange(n * 2, dtype=np.float32).reshape(n, 2) + offset) / 7.0
    root.create_group("data").create_array("action", data=a, chunks=(64, 2))
    root["data"].create_array("state", data=np.cos(np.arange(n * 5, dtype=np.float32)).reshape(n, 5))
    root.create_group("meta").create_array("episode_ends", data=np.arange(1, n_eps + 1) * length)
    return path


def vlaflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlaflow.cli", *args]


def env(pause: str | None = None, marker: Path | None = None) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    e.pop(PAUSE_ENV, None)
    if pause:
        e[PAUSE_ENV] = f"{pause}:{marker}"
    return e


def run_and_kill_at(cmd: list[str], point: str, marker: Path, timeout: float = 120.0) -> None:
    """Start ``cmd``, wait until it pauses at ``point``, SIGKILL it there."""
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env(point, marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"{cmd} ended (rc {proc.returncode}) before {point}: {err.decode()[-2000:]}")
        assert time.monotonic() - t0 < timeout, f"{cmd} never reached {point}"
        time.sleep(0.02)
    assert int(marker.read_text()) == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def kill_while_writing(cmd: list[str], dest: Path, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as its temp directory beside ``dest`` appears."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not leftovers(dest)["tmp"]:
        assert proc.poll() is None, f"{cmd} ended before its temp directory was seen"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def store_content(path: Path) -> dict[str, np.ndarray]:
    s = EpisodeStore.open(path)
    return {"ends": s.episode_ends, **{k: s.read(k) for k in s.keys}}


@pytest.fixture
def stores(tmp_path):
    old_src = dp_source(tmp_path / "old_src.zarr", n_eps=3)
    new_src = dp_source(tmp_path / "new_src.zarr", n_eps=7, offset=1000.0)
    dest = tmp_path / "dest.zarr"
    assert (
        subprocess.run(vlaflow_cmd("ingest", str(old_src), str(dest), "--no-progress"), env=env()).returncode
        == 0
    )
    return old_src, new_src, dest


@pytest.mark.parametrize("point", ["while-writing", "written", "aside", "swapped"])
def test_killed_ingest_overwrite_never_loses_the_old_store(stores, tmp_path, point, capsys):
    """Was: two SIGKILLs of `vlaflow ingest --overwrite` left the old store half-deleted and unreadable."""
    old_src, new_src, dest = stores
    old_files, old = digest(dest), store_content(dest)
    cmd = vlaflow_cmd("ingest", str(new_src), str(dest), "--overwrite", "--no-progress")
    if point == "while-writing":
        kill_while_writing(cmd, dest)
    else:
        run_and_kill_at(cmd, point, tmp_path / "marker")

    from vlaflow.cli import main

    if point == "aside":  # killed between the renames: the old store is whole beside the missing dest
        assert not dest.exists()
        (aside,) = leftovers(dest)["old"]
        assert digest(aside) == old_files
        assert main(["info", str(dest)]) == 1
        err = capsys.readouterr().err
        assert str(aside) in err and "vlaflow repair" in err
        assert main(["repair", str(dest)]) == 0
        assert "put back" in capsys.readouterr().out
    if point == "swapped":  # the new store is complete in place; the old copy is an abandoned leftover
        new = store_content(dest)
        assert new["ends"].tolist() == (np.arange(1, 8) * 40).tolist()
        assert validate_store(dest, progress=False).ok
        assert main(["info", str(dest)]) == 0
        assert "superseded" in capsys.readouterr().out  # the left copy is reported ...
        assert main(["repair", str(dest)]) == 0  # ... and cleaned
    else:
        assert digest(dest) == old_files  # byte for byte the old store
        now = store_content(dest)
        assert all(np.array_equal(now[k], old[k]) for k in old)
        assert validate_store(dest, progress=False).ok
        assert main(["info", str(dest)]) == 0
        if leftovers(dest)["tmp"]:
            assert "killed writer" in capsys.readouterr().out
        assert main(["repair", str(dest), "--discard-leftovers"]) == 0
    assert leftovers(dest) == {"tmp": [], "old": []}
    # and the same command, run again to the end, replaces it
    assert subprocess.run(cmd, env=env()).returncode == 0
    assert store_content(dest)["ends"].tolist() == (np.arange(1, 8) * 40).tolist()
    assert leftovers(dest) == {"tmp": [], "old": []}


def test_the_next_write_puts_back_what_a_killed_replacement_left_aside(stores, tmp_path, capsys):
    """Without `repair`: an ingest without --overwrite sees the put-back old store and refuses."""
    old_src, new_src, dest = stores
    old_files = digest(dest)
    run_and_kill_at(
        vlaflow_cmd("ingest", str(new_src), str(dest), "--overwrite", "--no-progress"),
        "aside",
        tmp_path / "m",
    )
    from vlaflow.cli import main

    assert main(["ingest", str(new_src), str(dest), "--no-progress"]) == 1
    assert "destination exists" in capsys.readouterr().err
    assert digest(dest) == old_files and leftovers(dest)["old"] == []


@pytest.mark.parametrize("point", ["aside", "written"])
def test_killed_export_lerobot_overwrite_keeps_the_old_export(stores, tmp_path, point):
    pytest.importorskip("pyarrow")
    old_src, new_src, dest = stores
    new_store = tmp_path / "new.zarr"
    assert (
        subprocess.run(
            vlaflow_cmd("ingest", str(new_src), str(new_store), "--no-progress"), env=env()
        ).returncode
        == 0
    )
    out = tmp_path / "lr"
    assert subprocess.run(vlaflow_cmd("export-lerobot", str(dest), str(out)), env=env()).returncode == 0
    before = digest(out)
    run_and_kill_at(
        vlaflow_cmd("export-lerobot", str(new_store), str(out), "--overwrite"), point, tmp_path / "m"
    )
    if point == "aside":
        assert not out.exists() and digest(leftovers(out)["old"][0]) == before
    # the next export puts the old one back first, then replaces it whole
    assert subprocess.run(vlaflow_cmd("export-lerobot", str(new_store), str(out)), env=env()).returncode == 1
    assert digest(out) == before
    assert (
        subprocess.run(
            vlaflow_cmd("export-lerobot", str(new_store), str(out), "--overwrite"), env=env()
        ).returncode
        == 0
    )
    assert digest(out) != before and leftovers(out)["old"] == []
