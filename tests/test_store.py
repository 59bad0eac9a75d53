"""Episode store: round trip, schema, crash safety (real SIGKILL), repair, fsspec URLs, key mismatches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vlaflow.data.store import EpisodeStore, KeySpec, atomic_store
from vlaflow.errors import StoreError

KEYS = {
    "action": KeySpec("float32", (3,)),
    "obs.state": KeySpec("float32", (4,), names=["a", "b", "c", "d"]),
    "obs.image.front": KeySpec("uint8", (16, 16, 3)),
}


def episode(i: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic content that identifies episode i and each of its steps."""
    t = np.arange(n, dtype=np.float32)[:, None]
    return {
        "action": i * 1000 + t + np.zeros((n, 3), np.float32),
        "obs.state": -(i * 1000 + t) + np.zeros((n, 4), np.float32),
        "obs.image.front": np.full((n, 16, 16, 3), i % 256, np.uint8),
    }


def test_round_trip_schema_and_metadata(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", KEYS, fps=15, attrs={"robot": "so101"})
    store.append_episode(episode(0, 7), task="pick", source="teleop", success=True)
    store.append_episode(episode(1, 3), task="place", source="teleop", success=False)
    store.append_episode(episode(2, 5), task="pick")
    s = EpisodeStore.open(tmp_path / "s.zarr")
    assert (s.n_episodes, s.n_steps, s.fps) == (3, 15, 15.0)
    assert s.episode_ends.tolist() == [7, 10, 15]
    assert s.keys["obs.state"].names == ["a", "b", "c", "d"] and s.keys["obs.image.front"].role == "image"
    assert s.attrs == {"robot": "so101"}
    assert s.episode_meta(0) == {"task": "pick", "source": "teleop", "success": True}
    assert s.episode_meta(1)["success"] is False and s.episode_meta(2)["success"] is None
    assert s.tasks == ["pick", "place"]
    for i, n in enumerate([7, 3, 5]):
        ep = s.get_episode(i)
        for k, v in episode(i, n).items():
            np.testing.assert_array_equal(ep[k], v)
    assert s.problems() == []
    # chunks along time stay within ~1-4 MB and use Blosc zstd
    arr = s.array("obs.image.front")
    assert 1 << 20 <= arr.chunks[0] * 16 * 16 * 3 <= 4 << 20
    assert "zstd" in str(arr.compressors)


def test_fsspec_url_reads_and_writes(tmp_path):
    url = f"file://{tmp_path}/remote.zarr"
    store = EpisodeStore.create(url, KEYS, fps=10)
    store.append_episode(episode(4, 6))
    s = EpisodeStore.open(url)
    assert s.n_episodes == 1
    np.testing.assert_array_equal(s.read("action"), episode(4, 6)["action"])


def test_bad_appends_are_rejected_without_writing(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", KEYS, fps=10)
    store.append_episode(episode(0, 4))
    bad = episode(1, 4)
    del bad["obs.state"]
    with pytest.raises(StoreError, match=r"missing \['obs.state'\]"):
        store.append_episode(bad)
    wrong = episode(1, 4)
    wrong["action"] = np.zeros((4, 2), np.float32)
    with pytest.raises(StoreError, match=r"'action': expected shape \(4, 3\).*got \(4, 2\)"):
        store.append_episode(wrong)
    floaty = episode(1, 4)
    floaty["obs.image.front"] = floaty["obs.image.front"].astype(np.float32)
    with pytest.raises(StoreError, match="uint8"):
        store.append_episode(floaty)
    ragged = episode(1, 4)
    ragged["action"] = ragged["action"][:3]
    with pytest.raises(StoreError, match="different lengths"):
        store.append_episode(ragged)
    assert EpisodeStore.open(tmp_path / "s.zarr").n_episodes == 1
    with pytest.raises(StoreError, match="no key 'obs.nope'.*has"):
        store.read("obs.nope")


def test_create_refuses_existing_and_open_refuses_non_store(tmp_path):
    EpisodeStore.create(tmp_path / "s.zarr", KEYS, fps=10)
    with pytest.raises(StoreError, match="destination exists"):
        EpisodeStore.create(tmp_path / "s.zarr", KEYS, fps=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not"):
        EpisodeStore.open(tmp_path / "empty")
    with pytest.raises(StoreError, match="no such episode store"):
        EpisodeStore.open(tmp_path / "missing.zarr")


def test_atomic_store_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_store(dest, KEYS, fps=10) as s:
            s.append_episode(episode(0, 3))
            raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_store(dest, KEYS, fps=10) as s:
        s.append_episode(episode(0, 3))
    assert EpisodeStore.open(dest).n_episodes == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_unfinished_tail_is_invisible_then_repaired(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", KEYS, fps=10)
    store.append_episode(episode(0, 5))
    # simulate a writer that died after writing data and metadata but before episode_ends
    for _, arr in store.root["data"].arrays():
        arr.resize((9, *arr.shape[1:]))
    store.root["meta/episode_task_index"].resize((2,))
    store.root["meta/episode_ends"].resize((2,))  # resized, chunk never rewritten: fill value -1
    s = EpisodeStore.open(tmp_path / "s.zarr", mode="a")
    assert s.n_episodes == 1 and s.n_steps == 5
    problems = s.problems()
    assert any("episode_ends" in p for p in problems) and any(
        "unfinished tail of 4 steps" in p for p in problems
    )
    done = s.repair()
    assert done and s.problems() == []
    s.append_episode(episode(1, 2))
    assert EpisodeStore.open(tmp_path / "s.zarr").episode_ends.tolist() == [5, 7]


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from test_store import KEYS, episode
from vlaflow.data.store import EpisodeStore
path = sys.argv[1]
try:
    s = EpisodeStore.open(path, mode="a")
except Exception:
    s = EpisodeStore.create(path, KEYS, fps=10)
i = s.n_episodes
while True:
    s.append_episode(episode(i, 40 + (i * 37) % 200), task=f"t{i % 3}", success=bool(i % 2))
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_episode_keeps_finished_episodes(tmp_path):
    """A real writer process is killed with SIGKILL at random moments, several times in a row."""
    path = tmp_path / "crash.zarr"
    rng = np.random.default_rng(0)
    tests_dir = os.path.dirname(__file__)
    reported = -1
    for round_ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tests_dir], stdout=subprocess.PIPE, text=True
        )
        # wait for the first completed episode of this round, then kill at a random moment
        line = proc.stdout.readline()
        assert line, f"writer died before finishing an episode (round {round_})"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        done = [int(x) for x in (line + out).split()]
        reported = max(reported, *done)
        s = EpisodeStore.open(path)
        # every episode the writer reported is there, at most one more (finished but unreported)
        assert reported + 1 <= s.n_episodes <= reported + 2
        for i in range(s.n_episodes):
            n = 40 + (i * 37) % 200
            ep = s.get_episode(i)
            np.testing.assert_array_equal(ep["action"], episode(i, n)["action"])
            np.testing.assert_array_equal(
                ep["obs.image.front"][[0, -1]], episode(i, n)["obs.image.front"][[0, -1]]
            )
            assert s.episode_meta(i)["task"] == f"t{i % 3}" and s.episode_meta(i)["success"] == bool(i % 2)
        reported = s.n_episodes - 1
    # after the kills the store still validates clean once repaired
    s = EpisodeStore.open(path, mode="a")
    s.repair()
    assert s.problems() == []
