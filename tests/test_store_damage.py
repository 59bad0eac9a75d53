"""A corruption corpus for the episode store: real stores on disk, real file damage (a deleted chunk file, a
truncated chunk per dtype, a bad ``episode_ends`` entry in the middle), and what reading, ``validate`` and
``repair`` do with each. The rule under test: a crash tail is trimmed (recoverably); damage is never silently
read as a prefix or as zeros, and repair refuses it, naming what it found."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import KEYS, WRITER, episode

from vlaflow.data.lock import LOCK_NAME
from vlaflow.data.store import EpisodeStore
from vlaflow.data.validate import validate_store
from vlaflow.errors import StoreError

# obs.image.front is 16*16*3 = 768 bytes a step, so its chunks hold 2730 steps: 200 episodes of 20..39 steps
# (5900 steps) span three image chunks, and the middle one covers whole episodes on both sides.
N_EPISODES = 200
IMAGE_ROWS = 2 * 1024 * 1024 // 768


def lengths(n: int = N_EPISODES) -> list[int]:
    return [20 + (i * 7) % 20 for i in range(n)]


def make_store(path: Path, n: int = N_EPISODES) -> Path:
    store = EpisodeStore.create(path, KEYS, fps=10)
    lens = lengths(n)
    eps = [episode(i, m) for i, m in enumerate(lens)]
    store.append_episodes(
        {k: np.concatenate([e[k] for e in eps]) for k in KEYS},
        lens,
        tasks=[f"t{i % 3}" for i in range(n)],
        sources=["test"] * n,
        successes=[bool(i % 2) for i in range(n)],
    )
    store.close()
    return path


def digest(path: Path) -> dict[str, str]:
    """Every file of a store and a hash of its bytes: 'changed nothing' means this is unchanged."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME  # the lock file is the open handle's, not the store's
    }


def set_entry(path: Path, index: int, value: int) -> None:
    arr = zarr.open_group(str(path), mode="r+")["meta/episode_ends"]
    raw = arr[:]
    raw[index] = value
    arr[:] = raw


def episode_of_step(step: int) -> int:
    return int(np.searchsorted(np.cumsum(lengths()), step, side="right"))


# ----------------------------------------------------------------------------- episode_ends damage


@pytest.mark.parametrize("bad", [0, -1, 10**9])
def test_bad_episode_ends_entry_in_the_middle_is_damage_not_an_unfinished_tail(tmp_path, bad):
    """Was: readers saw the 12 episodes before the bad entry and repair dropped the other 188."""
    path = make_store(tmp_path / "s.zarr")
    set_entry(path, 12, bad)
    before = digest(path)
    with pytest.raises(StoreError, match=r"meta/episode_ends\[12\].*vlaflow validate"):
        EpisodeStore.open(path)
    store = EpisodeStore.open(path, mode="a", check=False)
    with pytest.raises(StoreError, match=r"refus.*meta/episode_ends\[12\].*followed by 187 valid"):
        store.repair(dry_run=True)
    with pytest.raises(StoreError, match=r"refus.*meta/episode_ends\[12\]"):
        store.repair()
    store.close()
    assert digest(path) == before  # repair touched nothing
    report = validate_store(path, progress=False)
    assert report.damaged and not report.ok
    assert any("meta/episode_ends[12]" in line for line in report.lines())


def test_missing_episode_ends_chunk_is_damage_not_an_empty_store(tmp_path):
    """Was: a deleted meta/episode_ends chunk read as 'no finished episodes', repair emptied the store and
    validate then said OK."""
    path = make_store(tmp_path / "s.zarr")
    (path / "meta/episode_ends/c/0").unlink()
    before = digest(path)
    with pytest.raises(StoreError, match=r"meta/episode_ends.*chunk 0.*missing.*vlaflow validate"):
        EpisodeStore.open(path)
    with EpisodeStore.open(path, mode="a", check=False) as store:
        with pytest.raises(StoreError, match=r"refus.*meta/episode_ends.*chunk 0.*missing"):
            store.repair()
    assert digest(path) == before
    report = validate_store(path, progress=False)
    assert report.damaged
    missing = [f for f in report.findings if f.kind == "missing_chunk"]
    assert [(f.key, f.chunk) for f in missing] == [("meta/episode_ends", 0)]
    assert missing[0].file.endswith(os.path.join("meta", "episode_ends", "c", "0"))


def test_truncated_data_array_is_damage(tmp_path):
    """data shorter than episode_ends says (someone cut it): the episodes past it are damaged, not a tail."""
    path = make_store(tmp_path / "s.zarr")
    arr = zarr.open_group(str(path), mode="r+")["data/action"]
    arr.resize((3000, 3))
    with pytest.raises(StoreError, match=r"meta/episode_ends\[\d+\] = \d+.*data has 3000 steps"):
        EpisodeStore.open(path)


# ----------------------------------------------------------------------------- missing / corrupt chunks


@pytest.mark.parametrize(
    "key, chunk_file, chunk",
    [("obs.image.front", "c/1/0/0/0", 1), ("action", "c/0/0", 0)],
)
def test_deleted_data_chunk_is_found_by_the_cheap_check_and_by_validate(tmp_path, key, chunk_file, chunk):
    """Was: a deleted chunk read as zeros (every action row zeroed) and validate said OK."""
    path = make_store(tmp_path / "s.zarr")
    (path / "data" / key / chunk_file).unlink()
    store = EpisodeStore.open(path)  # episode_ends is intact: the store opens ...
    missing = store.missing_chunks()  # ... but the cheap check (a listing, no decoding) finds the hole
    assert [(m.key, m.chunk) for m in missing] == [(f"data/{key}", chunk)]
    m = missing[0]
    rows = (0, 5900) if key == "action" else (IMAGE_ROWS, 2 * IMAGE_ROWS)
    assert (m.rows[0], min(m.rows[1], 5900)) == rows
    assert m.episodes == (episode_of_step(rows[0]), episode_of_step(rows[1] - 1))
    assert m.file == str(path / "data" / key / chunk_file)
    with pytest.raises(StoreError, match=rf"data/{key}.*chunk {chunk}.*episodes {m.episodes[0]}"):
        store.require_intact()
    report = validate_store(path, progress=False)
    assert report.damaged
    line = next(x for x in report.lines() if f"data/{key}" in x)
    assert m.file in line and f"episodes {m.episodes[0]}..{m.episodes[1]}" in line
    with EpisodeStore.open(path, mode="a") as s, pytest.raises(StoreError, match="refus.*missing"):
        s.repair()


@pytest.mark.parametrize(
    "key, chunk_file, chunk",
    [
        ("data/action", "data/action/c/0/0", 0),  # float32
        ("data/obs.image.front", "data/obs.image.front/c/1/0/0/0", 1),  # uint8 image
        ("meta/episode_ends", "meta/episode_ends/c/0", 0),  # int64 metadata
    ],
)
def test_truncated_chunk_is_named_by_validate_per_dtype(tmp_path, key, chunk_file, chunk):
    """Was: validate never decoded uint8/int keys (a truncated image chunk passed) and a corrupt float chunk
    gave a raw blosc RuntimeError naming no file or key."""
    path = make_store(tmp_path / "s.zarr")
    f = path / chunk_file
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    report = validate_store(path, progress=False)
    assert report.damaged
    bad = [x for x in report.findings if x.kind == "corrupt_chunk"]
    assert [(x.key, x.chunk, x.file) for x in bad] == [(key, chunk, str(f))]
    if key == "meta/episode_ends":
        with pytest.raises(StoreError, match=r"meta/episode_ends.*chunk 0.*cannot be decoded.*validate"):
            EpisodeStore.open(path)
    else:
        assert bad[0].episodes is not None
        store = EpisodeStore.open(path)
        with pytest.raises(StoreError, match=rf"{key}.*chunk {chunk}.*cannot be decoded"):
            store.read(key.split("/", 1)[1])


def test_validate_of_a_healthy_store_reads_every_chunk(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    report = validate_store(path, progress=False)
    assert report.ok and report.findings == [] and report.n_episodes == N_EPISODES
    # every chunk of every array, data and metadata, uint8 and int included
    assert report.chunks_read == 3 + 1 + 1 + 4
    assert EpisodeStore.open(path).missing_chunks() == []


def test_validate_names_a_non_finite_value_with_its_episode(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    arr = zarr.open_group(str(path), mode="r+")["data/obs.state"]
    arr[1234, 2] = np.nan
    report = validate_store(path, progress=False)
    assert any(
        f"data/obs.state has a non-finite value at step 1234 (episode {episode_of_step(1234)})" in x
        for x in report.lines()
    )


# ----------------------------------------------------------------------------- genuine crash tails


class Killed(BaseException):
    """Stands in for a SIGKILL at one exact point of an append (real kills are in test_store.py)."""


def kill_at_episode_ends_write(monkeypatch):
    real = zarr.Array.__setitem__

    def setitem(self, sel, value):
        if self.path.endswith("episode_ends"):
            raise Killed
        return real(self, sel, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)


@pytest.mark.parametrize("n_before", [0, 3])
def test_kill_between_episode_ends_resize_and_write_is_a_tail(tmp_path, monkeypatch, n_before):
    """The one crash that leaves fill values in episode_ends -- including a missing chunk, when the killed
    append was the store's first -- is an unfinished tail: readers skip it, repair trims it recoverably."""
    path = tmp_path / "s.zarr"
    store = EpisodeStore.create(path, KEYS, fps=10)
    for i in range(n_before):
        store.append_episode(episode(i, 5), task="old")
    kill_at_episode_ends_write(monkeypatch)
    with pytest.raises(Killed):
        store.append_episodes(
            {k: np.concatenate([episode(n_before, 4)[k], episode(n_before + 1, 6)[k]]) for k in KEYS},
            [4, 6],
            tasks=["new", "new"],
        )
    monkeypatch.undo()
    store.close()
    assert (path / "meta/episode_ends/c/0").exists() == (n_before > 0)
    s = EpisodeStore.open(path)
    assert (s.n_episodes, s.n_steps) == (n_before, 5 * n_before)
    assert s.missing_chunks() == []  # a tail's chunks are not needed by any finished step
    report = validate_store(path, progress=False)
    assert not report.ok and not report.damaged  # unfinished: repair fixes it
    before = digest(path)
    with EpisodeStore.open(path, mode="a") as s:
        plan = s.repair(dry_run=True)
        assert plan.dry_run and plan.backup is None and any("episode_ends" in a for a in plan)
        assert digest(path) == before
        done = s.repair()
        assert list(done)[: len(plan.actions)] == plan.actions
        assert s.problems() == []
    backup = np.load(done.backup, allow_pickle=False)
    assert str(done.backup) in done.summary()
    np.testing.assert_array_equal(
        backup["data/action"],
        np.concatenate([episode(n_before, 4)["action"], episode(n_before + 1, 6)["action"]]),
    )
    assert backup["data/obs.image.front"].dtype == np.uint8 and backup["data/obs.image.front"].shape[0] == 10
    assert backup["meta/episode_task"].tolist() == ["new", "new"]
    assert int(backup["first_step"]) == 5 * n_before and int(backup["first_episode"]) == n_before
    s = EpisodeStore.open(path, mode="a")
    s.append_episode(episode(9, 2))
    assert s.episode_ends.tolist() == [5 * (i + 1) for i in range(n_before)] + [5 * n_before + 2]


def test_repair_after_real_sigkills_keeps_the_removed_tail_recoverable(tmp_path):
    path = tmp_path / "crash.zarr"
    tests_dir = os.path.dirname(__file__)
    for delay in (0.05, 0.23, 0.11):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tests_dir], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    with EpisodeStore.open(path, mode="a") as s:  # takes over the killed writer's stale lock
        n, steps = s.n_episodes, s.n_steps
        tail = {k: int(s.array(k).shape[0]) - steps for k in s.keys}
        done = s.repair()
        assert s.problems() == [] and s.n_episodes == n
    if done.backup is not None:
        backup = np.load(done.backup, allow_pickle=False)
        saved = {k: backup[f"data/{k}"].shape[0] if f"data/{k}" in backup.files else 0 for k in tail}
        assert saved == tail
    else:
        assert set(tail.values()) == {0}
    assert validate_store(path, progress=False).ok


def test_repair_of_a_healthy_store_does_nothing(tmp_path):
    path = make_store(tmp_path / "s.zarr", n=5)
    before = digest(path)
    with EpisodeStore.open(path, mode="a") as s:
        done = s.repair()
    assert not done and done.backup is None and list(done) == []
    after = digest(path)
    assert after == before


# ----------------------------------------------------------------------------- the rules on literal inputs

F = -1  # episode_ends' fill value


@pytest.mark.parametrize(
    "raw, missing, committed, want",
    [
        ([3, 5, 9], [], 3, (3, 0, None)),  # healthy
        ([3, 5, F, F], [], 2, (2, 2, None)),  # killed between resize and write: a tail
        ([F, F], [0], 0, (0, 2, None)),  # the first append killed: its chunk was never written
        ([3, 5, F, F], [], None, (2, 2, None)),  # a store from before n_committed: same rule
        (
            [3, F, 9],
            [],
            3,
            (1, 0, r"meta/episode_ends\[1\] = -1.*followed by 1 valid"),
        ),  # a fill value before a written entry
        ([3, 2, 9], [], 3, (1, 0, "not after the previous end 3")),  # not increasing
        ([3, 5, 99], [], 3, (2, 0, "past the end of the data")),  # the last entry past the data
        ([F, F, F], [0], 3, (0, 0, "chunk 0 .*missing, but 3 episodes were committed")),  # deleted chunk
        ([F, F, F], [0], None, (0, 0, "chunk 0 .*cannot be told")),  # old store: no way to know: damage
        ([3, 5, F], [], 3, (2, 0, "entries 2..2 read as fill values, but 3 episodes were committed")),
    ],
)
def test_check_episode_ends_rule(raw, missing, committed, want):
    from vlaflow.data.integrity import check_episode_ends

    got = check_episode_ends(np.asarray(raw, np.int64), F, 10, 4, missing, committed)
    assert (got.n_finished, got.n_tail) == want[:2]
    if want[2] is None:
        assert got.damage is None
    else:
        assert got.damage is not None and re.search(want[2], got.damage), got.damage


def test_all_fill_chunks_are_stored_and_stores_from_before_dense_chunks_still_open(tmp_path):
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, KEYS, fps=10) as s:
        zeros = {k: np.zeros((5, *v.shape), v.dtype) for k, v in KEYS.items()}
        s.append_episode(zeros)  # all zeros: zarr's default would store no chunk at all
        s.append_episode(zeros)
    assert (path / "data/action/c/0/0").exists() and (path / "meta/episode_success/c/0").exists()
    assert zarr.open_group(str(path))["meta/episode_ends"].attrs["n_committed"] == 2
    assert EpisodeStore.open(path).missing_chunks() == []
    # a store written before: no dense_chunks flag, the all-unknown success chunk legitimately absent
    root = zarr.open_group(str(path), mode="r+")
    schema = dict(root.attrs["vlaflow"])
    del schema["dense_chunks"]
    root.attrs["vlaflow"] = schema
    (path / "meta/episode_success/c/0").unlink()
    old = EpisodeStore.open(path)
    assert old.missing_chunks() == [] and old.episode_meta(1)["success"] is None
    assert validate_store(path, progress=False).ok
    (path / "data/action/c/0/0").unlink()  # but a missing data chunk is still reported, with the doubt
    (m,) = EpisodeStore.open(path).missing_chunks()
    assert m.key == "data/action" and "or all zeros in a store written before" in m.message


def test_repair_removes_leftover_partial_writes_and_can_back_up_elsewhere(tmp_path):
    """zarr writes <chunk>.<uuid>.partial and renames it; a SIGKILL in between leaves the .partial file."""
    path = make_store(tmp_path / "s.zarr", n=5)
    leftover = path / "data/action/c/0/0.0123abcd.partial"
    leftover.write_bytes(b"half a chunk")
    with EpisodeStore.open(path, mode="a") as s:
        for _, arr in s.root["data"].arrays():  # and an unfinished data tail of 3 steps
            arr.resize((arr.shape[0] + 3, *arr.shape[1:]))
        report = validate_store(s, progress=False)
        assert not report.damaged and any(".partial" in x for x in report.lines())
        assert report.writer is not None and report.writer["pid"] == os.getpid()
        assert "a writer holds the store" in report.summary()
        done = s.repair(backup_dir=tmp_path / "backups")
    assert not leftover.exists() and any("partial" in a for a in done)
    assert Path(done.backup).parent == tmp_path / "backups"
    assert np.load(done.backup, allow_pickle=False)["data/action"].shape == (3, 3)
    assert validate_store(path, progress=False).ok


# ----------------------------------------------------------------------------- the commands
def test_validate_and_repair_commands_exit_codes_and_dry_run(tmp_path, capsys):
    """validate: 0 sound / 2 damaged; repair refuses damage (exit 2, nothing changed); info refuses zeros."""
    from vlaflow.cli import main

    path = make_store(tmp_path / "s.zarr", n=40)
    assert main(["validate", str(path), "--no-progress"]) == 0
    assert main(["repair", str(path), "--dry-run"]) == 0
    set_entry(path, 5, 0)  # a bad entry with valid ones after it: damage
    before = digest(path)
    assert main(["validate", str(path), "--no-progress"]) == 2
    assert "DAMAGE" in capsys.readouterr().out
    assert main(["repair", str(path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert digest(path) == before
    path2 = make_store(tmp_path / "t.zarr", n=40)
    (path2 / "data" / "action" / "c" / "0" / "0").unlink()
    assert main(["info", str(path2)]) == 1
    assert "missing" in capsys.readouterr().err
