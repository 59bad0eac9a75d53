"""``vlaflow view``, headless: Rerun recordings read back with rerun's own reader, mp4s decoded with PyAV,
for the PushT store (a camera), the SO-101 recording (no cameras: imported with --skip-missing-video) and a
small built store with an odd-sized camera and a success flag; then the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared

from vlaflow.cli import main as cli_main
from vlaflow.data.store import EpisodeStore, KeySpec

rr = pytest.importorskip("rerun", reason="rerun-sdk (extra 'view') is not installed")
av = pytest.importorskip("av")

from rerun.chunk import RrdReader  # noqa: E402


def _rrd(path: Path) -> dict[str, dict]:
    """entity path -> {"rows": rows logged on the step timeline, "static": {column: first value}}."""
    reader = RrdReader(path)
    (rec,) = reader.recordings()
    assert rec.application_id == "vlaflow_view"
    out: dict[str, dict] = {}
    for c in reader.stream().to_chunks():
        e = out.setdefault(c.entity_path, {"rows": 0, "static": {}, "timelines": set()})
        if c.is_static:
            rb = c.to_record_batch()
            for name in rb.schema.names[1:]:
                e["static"][name] = rb.column(name).to_pylist()[0]
        else:
            e["rows"] += c.num_rows
            e["timelines"] |= set(c.timeline_names)
    return out


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        (stream,) = c.streams.video
        assert stream.codec_context.name == "h264"
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])


@pytest.fixture(scope="module")
def so101_store(tmp_path_factory) -> Path:
    from vlaflow.data.ingest import lerobot

    src = shared("so101_record_test")
    dest = tmp_path_factory.mktemp("so101") / "so101.zarr"
    lerobot.ingest(src, dest, skip_missing_video=True, progress=False)
    return dest


def test_pusht_rrd_and_folder(pusht_store, tmp_path, capsys):
    store = EpisodeStore.open(pusht_store)
    ep = int(np.argmin(store.episode_lengths))  # the shortest episode (49 steps) keeps this fast
    n = int(store.episode_lengths[ep])
    frames = store.get_episode(ep, ["obs.image.top"])["obs.image.top"]
    action = store.get_episode(ep, ["action"])["action"]
    rrd, out = tmp_path / "pusht.rrd", tmp_path / "view"
    assert (
        cli_main(["view", str(pusht_store), "--episode", str(ep), "--save", str(rrd), "--out", str(out)]) == 0
    )
    assert f"{n} steps" in capsys.readouterr().out

    ents = _rrd(rrd)
    for path in ("/obs/image/top", "/action", "/obs/state", "/episode/task", "/episode/info"):
        assert path in ents, sorted(ents)
    assert ents["/obs/image/top"]["rows"] == n and ents["/action"]["rows"] == n
    assert {"step", "time"} <= ents["/action"]["timelines"]
    task = "push the T-shaped block onto the T-shaped target"
    assert ents["/episode/task"]["static"]["TextDocument:text"] == [task]
    assert f"episode {ep}" in ents["/episode/info"]["static"]["TextDocument:text"][0]
    assert ents["/action"]["static"]["SeriesLines:names"] == ["0", "1"]
    # the logged scalars are the store's actions
    (chunk,) = [
        c for c in RrdReader(rrd).stream().to_chunks() if c.entity_path == "/action" and not c.is_static
    ]
    logged = np.array(chunk.to_record_batch().column("Scalars:scalars").to_pylist(), dtype=np.float32)
    assert np.array_equal(logged, action)

    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "episode.json", "frames.png", "top.mp4"]
    video = _decode(out / "top.mp4")
    assert video.shape == (n, 96, 96, 3)
    assert np.abs(video.astype(int) - frames).mean() < 6  # H.264 at crf 20: close, not exact
    summary = json.loads((out / "episode.json").read_text())
    assert (summary["episode"], summary["n_steps"], summary["task"]) == (ep, n, task)
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "curves.png").shape[0] > 400  # 5 panels (action, state, 3 more obs keys)
    assert mpimg.imread(out / "frames.png").ndim == 3


def test_so101_rrd_and_folder(so101_store, tmp_path, capsys):
    rrd, out = tmp_path / "so.rrd", tmp_path / "view"
    assert cli_main(["view", str(so101_store), "--episode", "2", "--save", str(rrd), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no camera keys" in captured.err
    n = int(EpisodeStore.open(so101_store).episode_lengths[2])
    ents = _rrd(rrd)
    assert ents["/action"]["rows"] == n and ents["/obs/state"]["rows"] == n
    assert ents["/obs/state"]["static"]["SeriesLines:names"][0] == "shoulder_pan.pos"
    assert ents["/episode/task"]["static"]["TextDocument:text"] == [
        "Pick the orange cube and place it in the box"
    ]
    assert not any(p.startswith("/obs/image") for p in ents)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "episode.json"]
    summary = json.loads((out / "episode.json").read_text())
    assert summary["videos"] == {} and summary["fps"] == 30.0 and summary["n_steps"] == n


def test_odd_camera_and_success(tmp_path):
    """An odd-sized camera (H.264 wants even sizes: padded by one row / column) and a success flag."""
    path = tmp_path / "odd.zarr"
    keys = {
        "obs.image.wrist": KeySpec("uint8", (45, 61, 3)),
        "obs.state": KeySpec("float32", (3,), names=["x", "y", "z"]),
        "action": KeySpec("float32", (2,)),
    }
    rng = np.random.default_rng(0)
    t = 12
    img = np.zeros((t, 45, 61, 3), np.uint8)
    img[:, :, :30] = 200  # a left half that the decoded video must keep
    with EpisodeStore.create(path, keys, fps=15) as s:
        s.append_episode(
            {
                "obs.image.wrist": img,
                "obs.state": rng.normal(size=(t, 3)).astype(np.float32),
                "action": rng.normal(size=(t, 2)).astype(np.float32),
            },
            task="wave",
            success=True,
        )
    rrd, out = tmp_path / "odd.rrd", tmp_path / "view"
    assert cli_main(["view", str(path), "--save", str(rrd), "--out", str(out), "--jpeg-quality", "90"]) == 0
    ents = _rrd(rrd)
    assert ents["/obs/image/wrist"]["rows"] == t and ents["/episode/success"]["rows"] == t
    assert "success: yes" in ents["/episode/info"]["static"]["TextDocument:text"][0]
    video = _decode(out / "wrist.mp4")
    assert video.shape == (t, 46, 62, 3)
    assert video[:, :45, :28].mean() > 180 and video[:, :45, 33:61].mean() < 20
    assert json.loads((out / "episode.json").read_text())["success"] is True


def test_bad_input(pusht_store, tmp_path, capsys, monkeypatch):
    rrd = tmp_path / "x.rrd"
    assert cli_main(["view", str(pusht_store), "--episode", "206", "--save", str(rrd)]) == 1
    err = capsys.readouterr().err
    assert "episode 206 out of range" in err and "206 episodes" in err and not rrd.exists()
    assert cli_main(["view", str(pusht_store), "--episode", "-1", "--save", str(rrd)]) == 1
    assert "out of range" in capsys.readouterr().err

    rrd.write_bytes(b"keep")
    assert cli_main(["view", str(pusht_store), "--episode", "3", "--save", str(rrd)]) == 1
    assert "exists" in capsys.readouterr().err and rrd.read_bytes() == b"keep"
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(["view", str(pusht_store), "--episode", "3", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and not any(out.iterdir())
    assert cli_main(["view", str(pusht_store), "--out", str(pusht_store / "view")]) == 1
    assert "never writes into what it reads" in capsys.readouterr().err
    assert cli_main(["view", str(pusht_store), "--out", str(out), "--overwrite"]) == 0
    assert (out / "top.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    lerobot_dir = shared("so101_record_test")
    assert cli_main(["view", str(lerobot_dir), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "not a vlaflow episode store" in err and "vlaflow ingest" in err and "vlaflow view OUT.zarr" in err

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli_main(["view", str(pusht_store)]) == 1
    assert "--save FILE.rrd" in capsys.readouterr().err
    assert cli_main(["view", str(pusht_store), "--spawn"]) == 1
    assert "no display" in capsys.readouterr().err


def test_raw_diffusion_policy_zarr_opens_read_only_as_info_does(tmp_path):
    """diffusion_policy's own zarr (v2, float32 images under ``img``) is viewed as ``info`` reads it."""
    import zarr

    raw = shared("pusht_cchi_v7", "pusht_cchi_v7_replay.zarr")
    root = zarr.open_group(str(raw), mode="r")
    ends = root["meta"]["episode_ends"][:3]
    n = int(ends[2] - ends[1])
    out = tmp_path / "view"
    assert cli_main(["view", str(raw), "--episode", "2", "--out", str(out)]) == 0
    video = _decode(out / "img.mp4")
    assert video.shape == (n, 96, 96, 3)
    ref = root["data"]["img"][int(ends[1]) : int(ends[2])]
    assert np.abs(video.astype(float) - ref).mean() < 6
    assert json.loads((out / "episode.json").read_text())["fps"] is None  # the v2 layout records no fps
