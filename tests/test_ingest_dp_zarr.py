"""diffusion_policy zarr ingest: the real PushT human demos, and the bad-input corpus."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from conftest import shared

from vlaflow.cli import main
from vlaflow.data.ingest import detect_format, dp_zarr
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import IngestError


def test_pusht_ingest_is_exact(pusht_store):
    src = zarr.open_group(str(shared("pusht_cchi_v7", "pusht_cchi_v7_replay.zarr")), mode="r")
    s = EpisodeStore.open(pusht_store)
    assert (s.n_episodes, s.n_steps, s.fps) == (206, 25650, 10.0)
    np.testing.assert_array_equal(s.episode_ends, src["meta/episode_ends"][:])
    np.testing.assert_array_equal(s.read("action"), src["data/action"][:])
    np.testing.assert_array_equal(s.read("obs.state"), src["data/state"][:])
    np.testing.assert_array_equal(s.read("obs.keypoint"), src["data/keypoint"][:])
    np.testing.assert_array_equal(s.read("obs.agent_pos"), src["data/state"][:, :2])
    img = s.array("obs.image.top")
    assert img.dtype == np.uint8
    for sl in (slice(0, 300), slice(25000, 25650)):
        np.testing.assert_array_equal(img[sl], src["data/img"][sl].astype(np.uint8))
    assert s.episode_meta(0)["task"] == dp_zarr.PUSHT_INSTRUCTION


def test_info_json_cli(pusht_store, capsys):
    assert main(["info", str(pusht_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_episodes"] == 206 and info["n_steps"] == 25650 and info["fps"] == 10.0
    assert info["keys"]["obs.image.top"] == {"shape": [96, 96, 3], "dtype": "uint8", "role": "image"}
    assert info["keys"]["action"]["shape"] == [2]


def _small_dp_store(path, n_eps=3, length=5, action_nan_at=None, ends=None):
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    n = n_eps * length
    a = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    if action_nan_at is not None:
        a[action_nan_at, 1] = np.nan
    root.create_group("data").create_array("action", data=a, chunks=(4, 2))
    root["data"].create_array("state", data=np.ones((n, 3), np.float32), chunks=(4, 3))
    root.create_group("meta").create_array(
        "episode_ends",
        data=np.asarray(ends if ends is not None else np.arange(1, n_eps + 1) * length, np.int64),
    )
    return path


def test_generic_store_and_key_map(tmp_path):
    src = _small_dp_store(tmp_path / "src.zarr")
    assert detect_format(src) == "dp-zarr"
    dp_zarr.ingest(src, tmp_path / "a.zarr", progress=False)
    assert set(EpisodeStore.open(tmp_path / "a.zarr").keys) == {"action", "obs.state"}
    dp_zarr.ingest(src, tmp_path / "b.zarr", key_map={"state": "obs.joints"}, task="wave", progress=False)
    s = EpisodeStore.open(tmp_path / "b.zarr")
    assert set(s.keys) == {"action", "obs.joints"} and s.episode_meta(2)["task"] == "wave"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("nan", r"data/action: non-finite value at step 7 \(episode 1\)"),
        ("ends", r"episode_ends is not strictly increasing at episode 2"),
        ("short", r"data/action has 15 steps, meta/episode_ends says 20"),
        ("corrupt", r"cannot read as a diffusion_policy zarr store"),
    ],
)
def test_bad_input_gets_one_clear_error_and_no_destination(tmp_path, kind, match):
    if kind == "nan":
        src = _small_dp_store(tmp_path / "src.zarr", action_nan_at=7)
    elif kind == "ends":
        src = _small_dp_store(tmp_path / "src.zarr", ends=[5, 10, 10])
    elif kind == "short":
        src = _small_dp_store(tmp_path / "src.zarr", ends=[5, 10, 20])
    else:
        src = _small_dp_store(tmp_path / "src.zarr")
        (src / "data" / "action" / ".zarray").write_text("{ not json")
    with pytest.raises(IngestError, match=match):
        dp_zarr.ingest(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.zarr"]  # no temp dir left behind


def test_cli_errors(tmp_path, capsys):
    src = _small_dp_store(tmp_path / "src.zarr")
    (tmp_path / "exists.zarr").mkdir()
    assert main(["ingest", str(src), str(tmp_path / "exists.zarr")]) == 1
    assert "destination exists" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "nope"), str(tmp_path / "o.zarr")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "mystery").mkdir()
    (tmp_path / "mystery" / "x.txt").write_text("?")
    assert main(["ingest", str(tmp_path / "mystery"), str(tmp_path / "o.zarr")]) == 1
    assert "cannot tell its format" in capsys.readouterr().err
    assert main(["ingest", str(src), str(tmp_path / "o.zarr"), "--no-progress"]) == 0
    assert main(["validate", str(tmp_path / "o.zarr")]) == 0


def test_validate_and_repair_cli(tmp_path, capsys):
    src = _small_dp_store(tmp_path / "src.zarr")
    dp_zarr.ingest(src, tmp_path / "o.zarr", progress=False)
    s = EpisodeStore.open(tmp_path / "o.zarr", mode="a")
    s.root["data/action"].resize((17, 2))  # an unfinished tail
    assert main(["validate", str(tmp_path / "o.zarr")]) == 1
    assert "unfinished tail of 2 steps" in capsys.readouterr().out
    assert main(["repair", str(tmp_path / "o.zarr")]) == 0
    assert main(["validate", str(tmp_path / "o.zarr")]) == 0
    shutil.rmtree(tmp_path / "o.zarr")
