"""LeRobot v2.1 / v3.0 ingest, v3.0 export, and the video I/O under them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lerobot_fixtures import TASKS, make_v21, make_v30, rewrite_parquet, synthetic_frames  # noqa: E402

from vlaflow.cli import main as cli_main  # noqa: E402
from vlaflow.data import lerobot_format as F  # noqa: E402
from vlaflow.data.ingest import detect_format  # noqa: E402
from vlaflow.data.ingest import lerobot as L  # noqa: E402
from vlaflow.data.lerobot_export import export_lerobot  # noqa: E402
from vlaflow.data.store import EpisodeStore, KeySpec  # noqa: E402
from vlaflow.data.video import VideoError, VideoReader, VideoWriter, available_codecs, read_video  # noqa: E402
from vlaflow.errors import IngestError  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SO101 = SHARED / "so101_record_test"
LOSSY_MAE = 4.0  # mean abs error (0..255) allowed for yuv420p H.264 / AV1 on the smooth synthetic frames


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _assert_frames_match(decoded: np.ndarray, source: np.ndarray) -> None:
    """Same shape, close to the source, and closer to it than to the next frame (no off-by-one)."""
    assert decoded.shape == source.shape and decoded.dtype == np.uint8
    assert _mae(decoded, source) < LOSSY_MAE
    if len(source) > 1:
        assert _mae(decoded[1:], source[:-1]) > _mae(decoded[1:], source[1:]) + 1.0


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------- video I/O
def test_codecs_available_here():
    codecs = available_codecs()
    assert "libx264" in codecs["h264"]["encoders"] and "h264" in codecs["h264"]["decoders"]
    assert codecs["av1"]["encoders"] and codecs["av1"]["decoders"], codecs


@pytest.mark.parametrize("codec", ["h264", "av1", "h264-lossless"])
def test_video_write_read_ranges(tmp_path, codec):
    frames = synthetic_frames(30, 64, 96, seed=3)
    path = tmp_path / f"v_{codec}.mp4"
    with VideoWriter(path, fps=30, width=96, height=64, video_codec=codec) as w:
        w.write(frames[:12])  # two "episodes" concatenated in one file
        w.write(frames[12:])
    with VideoReader(path) as r:
        a = r.read_range(0.0, 12 / 30, expected=12)
        b = r.read_range(12 / 30, 30 / 30, expected=18)  # continues without seeking
        c = r.read_range(20 / 30, 25 / 30, expected=5)  # seeks back
    every = np.concatenate([a, b])
    if codec == "h264-lossless":
        assert np.array_equal(every, frames) and np.array_equal(c, frames[20:25])
    else:
        _assert_frames_match(every, frames)
        _assert_frames_match(c, frames[20:25])
    with pytest.raises(VideoError, match=r"expected 31 frames .* found 30"):
        read_video(path, expected=31)


def test_video_writer_rejects_odd_sizes_for_yuv420(tmp_path):
    with pytest.raises(VideoError, match="even frame sizes"):
        VideoWriter(tmp_path / "odd.mp4", 10, 63, 64, "h264")


# ------------------------------------------------------------------------------------ the real SO-101 sample
@pytest.fixture(scope="module")
def so101():
    if not (SO101 / "meta" / "info.json").is_file():
        pytest.skip(f"shared sample {SO101} is absent")
    return SO101


def test_so101_missing_videos_stop_with_one_clear_error(so101, tmp_path):
    dest = tmp_path / "so.zarr"
    assert detect_format(so101) == "lerobot"
    with pytest.raises(IngestError) as err:
        L.ingest(so101, dest, progress=False)
    msg = str(err.value)
    for cam in ("front", "top"):
        assert f"videos/observation.images.{cam}/chunk-000/file-000.mp4" in msg
        assert f"obs.image.{cam}" in msg
    assert "--skip-missing-video" in msg
    assert not dest.exists() and not _no_leftovers(tmp_path)


def test_so101_skip_missing_video_imports_the_rest(so101, tmp_path):
    dest = tmp_path / "so.zarr"
    summary = L.ingest(so101, dest, skip_missing_video=True, progress=False)
    assert summary["skipped_cameras"] == ["observation.images.front", "observation.images.top"]
    store = EpisodeStore.open(dest)
    assert (store.n_episodes, store.n_steps, store.fps) == (4, 1492, 30.0)
    assert set(store.keys) == {"action", "obs.state"}
    table = pq.read_table(so101 / "data/chunk-000/file-000.parquet")
    for lr, key in (("action", "action"), ("observation.state", "obs.state")):
        ref = np.array(table.column(lr).to_pylist(), dtype=np.float32)
        assert np.array_equal(store.read(key), ref)
    assert store.keys["action"].names[0] == "shoulder_pan.pos"
    ends = np.cumsum(
        pq.read_table(so101 / "meta/episodes/chunk-000/file-000.parquet").column("length").to_numpy()
    )
    assert np.array_equal(store.episode_ends, ends)
    for i in range(4):
        meta = store.episode_meta(i)
        assert meta["task"] == "Pick the orange cube and place it in the box"
        assert meta["source"] == "lerobot:so101_record_test"


def test_so101_cli(so101, tmp_path, capsys):
    dest = tmp_path / "so.zarr"
    assert cli_main(["ingest", str(so101), str(dest), "--no-progress"]) == 1
    assert "--skip-missing-video" in capsys.readouterr().err and not dest.exists()
    assert cli_main(["ingest", str(so101), str(dest), "--skip-missing-video", "--no-progress"]) == 0
    assert "4 episodes, 1492 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ built datasets
def _check_ingested(dest: Path, built: dict, cameras: list[str]) -> EpisodeStore:
    store = EpisodeStore.open(dest)
    eps = built["episodes"]
    assert store.n_episodes == len(eps) and store.n_steps == built["n_frames"] and store.fps == built["fps"]
    assert set(store.keys) == {"action", "obs.state", *(f"obs.image.{c}" for c in cameras)}
    for i, ep in enumerate(eps):
        got = store.get_episode(i)
        assert np.array_equal(got["action"], ep["action"]) and np.array_equal(got["obs.state"], ep["state"])
        assert store.episode_meta(i)["task"] == ep["task"]
        for cam in cameras:
            _assert_frames_match(got[f"obs.image.{cam}"], ep["frames"][cam])
    return store


def test_v21_h264_ingest(tmp_path):
    # episode 2 lives in chunk-001; "wrist" is an image feature (PNG bytes in the parquet), not a video
    built = make_v21(tmp_path / "ds21", chunks_size=2, image_cameras={"wrist": (24, 32)})
    summary = L.ingest(tmp_path / "ds21", tmp_path / "v21.zarr", progress=False)
    assert summary["codebase_version"] == "v2.1" and summary["tasks"] == TASKS
    store = _check_ingested(tmp_path / "v21.zarr", built, ["front", "wrist"])
    assert store.keys["action"].names == ["a0", "a1", "a2"]
    for i, ep in enumerate(built["episodes"]):  # PNG is lossless
        assert np.array_equal(
            store.get_episode(i, ["obs.image.wrist"])["obs.image.wrist"], ep["frames"]["wrist"]
        )


def test_v30_av1_ingest_multi_file(tmp_path):
    built = make_v30(tmp_path / "ds30", episodes_per_file=3)  # data + videos in file-000 and file-001
    assert (tmp_path / "ds30/videos/observation.images.top/chunk-000/file-001.mp4").is_file()
    with VideoReader(tmp_path / "ds30/videos/observation.images.top/chunk-000/file-000.mp4") as r:
        assert r._stream.codec_context.codec.canonical_name == "av1"
    L.ingest(tmp_path / "ds30", tmp_path / "v30.zarr", progress=False)
    _check_ingested(tmp_path / "v30.zarr", built, ["top", "wrist"])


# ---------------------------------------------------------------------------------------------- export
def _make_store(path: Path, n_eps: int = 3, cams: dict | None = None) -> EpisodeStore:
    cams = {"front": (48, 64)} if cams is None else cams
    rng = np.random.default_rng(5)
    keys = {
        "action": KeySpec("float32", (3,), names=["x", "y", "grip"]),
        "obs.state": KeySpec("float32", (4,)),
        "obs.contact": KeySpec("float32", (1,)),
        **{f"obs.image.{c}": KeySpec("uint8", (h, w, 3)) for c, (h, w) in cams.items()},
    }
    store = EpisodeStore.create(path, keys=keys, fps=10, attrs={"lerobot": {"robot_type": "sim_arm"}})
    for e in range(n_eps):
        t = 7 + 3 * e
        data = {
            "action": rng.normal(size=(t, 3)).astype(np.float32),
            "obs.state": rng.normal(size=(t, 4)).astype(np.float32),
            "obs.contact": rng.integers(0, 2, (t, 1)).astype(np.float32),
            **{
                f"obs.image.{c}": synthetic_frames(t, h, w, seed=e + j)
                for j, (c, (h, w)) in enumerate(cams.items())
            },
        }
        store.append_episode(data, task=TASKS[e % 2], source="test")
    return store


def test_export_layout_follows_v30(tmp_path):
    src = _make_store(tmp_path / "s.zarr")
    out = tmp_path / "lr"
    summary = export_lerobot(tmp_path / "s.zarr", out, video_codec="h264", progress=False)
    assert summary["n_episodes"] == 3 and summary["n_frames"] == src.n_steps
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "sim_arm"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, src.n_steps, 2)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    ft = info["features"]
    assert ft["action"] == {"dtype": "float32", "shape": [3], "names": ["x", "y", "grip"]}
    assert ft["observation.images.front"]["dtype"] == "video" and ft["observation.images.front"]["shape"] == [
        48,
        64,
        3,
    ]
    assert ft["observation.images.front"]["info"]["video.codec"] == "h264"
    assert {"timestamp", "frame_index", "episode_index", "index", "task_index", "observation.contact"} <= set(
        ft
    )
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert str(data.schema.field("action").type) == "fixed_size_list<element: float>[3]"
    assert str(data.schema.field("observation.contact").type) == "float"  # shape [1] -> a scalar column
    assert data.column("index").to_pylist() == list(range(src.n_steps))
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == src.episode_lengths.tolist()
    assert [e["tasks"] for e in eps] == [[TASKS[0]], [TASKS[1]], [TASKS[0]]]
    assert eps[1]["dataset_from_index"] == eps[0]["dataset_to_index"] == eps[0]["length"]
    key = "videos/observation.images.front"
    assert eps[1][f"{key}/from_timestamp"] == pytest.approx(eps[0]["length"] / 10)
    assert eps[2][f"{key}/to_timestamp"] == pytest.approx(src.n_steps / 10)
    assert (
        eps[0]["stats/action/count"] == [eps[0]["length"]]
        and len(eps[0]["stats/observation.images.front/mean"]) == 3
    )
    assert F.read_tasks_parquet(out / "meta/tasks.parquet") == {0: TASKS[0], 1: TASKS[1]}
    stats = json.loads((out / "meta/stats.json").read_text())
    act = src.read("action")
    assert np.allclose(stats["action"]["min"], act.min(0)) and np.allclose(
        stats["action"]["mean"], act.mean(0)
    )
    assert np.allclose(stats["action"]["std"], act.std(0), atol=1e-6) and stats["action"]["count"] == [
        src.n_steps
    ]
    assert {"q01", "q99"} <= set(stats["action"]) and np.array(
        stats["observation.images.front"]["mean"]
    ).shape == (3, 1, 1)
    video = out / "videos/observation.images.front/chunk-000/file-000.mp4"
    frames = read_video(video, expected=src.n_steps)
    _assert_frames_match(frames, src.read("obs.image.front"))
    # LeRobot finds a row's frame at from_timestamp + timestamp, within tolerance_s = 1e-4
    import av

    with av.open(str(video)) as c:
        times = np.array([float(f.pts * f.time_base) for f in c.decode(c.streams.video[0])])
    from_ts = np.array([e[f"{key}/from_timestamp"] for e in eps])[data.column("episode_index").to_numpy()]
    query = from_ts + data.column("timestamp").to_numpy()
    assert np.abs(times[np.abs(query[:, None] - times[None]).argmin(1)] - query).max() < 1e-4
    assert np.array_equal(np.abs(query[:, None] - times[None]).argmin(1), np.arange(src.n_steps))


def test_export_ingest_roundtrip_lossless_is_exact(tmp_path):
    src = _make_store(tmp_path / "s.zarr", cams={"front": (48, 64), "side": (33, 45)})  # odd sizes: RGB only
    export_lerobot(tmp_path / "s.zarr", tmp_path / "lr", video_codec="h264-lossless", progress=False)
    L.ingest(tmp_path / "lr", tmp_path / "back.zarr", progress=False)
    back = EpisodeStore.open(tmp_path / "back.zarr")
    assert back.keys.keys() == src.keys.keys() and back.fps == src.fps
    assert np.array_equal(back.episode_ends, src.episode_ends)
    for k in src.keys:
        assert back.keys[k].shape == src.keys[k].shape and back.keys[k].dtype == src.keys[k].dtype
        assert np.array_equal(back.read(k), src.read(k)), k
    assert [back.episode_meta(i)["task"] for i in range(3)] == [src.episode_meta(i)["task"] for i in range(3)]
    assert back.keys["action"].names == ["x", "y", "grip"]


def test_export_ingest_roundtrip_av1_multi_file(tmp_path):
    src = _make_store(tmp_path / "s.zarr", n_eps=4)
    # tiny size limits force a new data file and a new video file per episode
    summary = export_lerobot(
        tmp_path / "s.zarr",
        tmp_path / "lr",
        video_codec="av1",
        progress=False,
        data_files_size_in_mb=1e-4,
        video_files_size_in_mb=1e-4,
    )
    # encoders buffer frames, so the byte count that triggers a new video file lags by about an episode
    assert summary["data_files"] == 4 and summary["video_files"]["observation.images.front"] >= 2
    assert summary["encoder"] in ("libsvtav1", "libaom-av1")
    L.ingest(tmp_path / "lr", tmp_path / "back.zarr", progress=False)
    back = EpisodeStore.open(tmp_path / "back.zarr")
    for k in ("action", "obs.state", "obs.contact"):
        assert np.array_equal(back.read(k), src.read(k))
    _assert_frames_match(back.read("obs.image.front"), src.read("obs.image.front"))


def test_export_refuses_existing_output_and_cli(tmp_path, capsys):
    _make_store(tmp_path / "s.zarr", n_eps=1)
    out = tmp_path / "lr"
    out.mkdir()
    assert cli_main(["export-lerobot", str(tmp_path / "s.zarr"), str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(["export-lerobot", str(tmp_path / "s.zarr"), str(out), "--overwrite"]) == 0
    assert json.loads((out / "meta/info.json").read_text())["total_episodes"] == 1


# ---------------------------------------------------------------------------------------------- bad input
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _set_feature_shape(root: Path) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = [7]
    (root / "meta/info.json").write_text(json.dumps(info))


def _swap_timestamps(p: Path) -> None:
    rewrite_parquet(p, "timestamp", lambda t: t[[0, 1, 3, 2, *range(4, len(t))]])


def _nan_action(p: Path) -> None:
    def f(a):
        a[5, 1] = np.nan
        return a

    rewrite_parquet(p, "action", f)


def _inf_action(p: Path) -> None:
    def f(a):
        a[2, 0] = np.inf
        return a

    rewrite_parquet(p, "action", f)


def _short_video(p: Path) -> None:
    with VideoReader(p) as r:
        frames = r.read_range(0.0, None)
    with VideoWriter(p, 10, frames.shape[2], frames.shape[1], "h264") as w:
        w.write(frames[:-1])


def _late_start(p: Path) -> None:
    """Episode 1's video range starts one frame late: the range holds one frame less than its length."""
    rewrite_parquet(
        p, "videos/observation.images.top/from_timestamp", lambda t: t + np.array([0, 1, 0, 0]) / 15
    )


V21_EP1 = "data/chunk-000/episode_000001.parquet"
V21_VID1 = "videos/chunk-000/observation.images.front/episode_000001.mp4"
BAD_INPUTS = {
    # name: (version, file to damage, damage, words the one error must contain)
    "truncated data parquet": (
        "v2.1",
        V21_EP1,
        _truncate,
        ["episode_000001.parquet", "truncated or corrupt"],
    ),
    "truncated episode table": (
        "v3.0",
        "meta/episodes/chunk-000/file-000.parquet",
        _truncate,
        ["file-000.parquet"],
    ),
    "missing video": ("v2.1", V21_VID1, Path.unlink, ["episode_000001.mp4", "obs.image.front", "missing"]),
    "short video": (
        "v2.1",
        V21_VID1,
        _short_video,
        ["episode_000001.mp4", "observation.images.front", "needs 15 frames", "says it has 14"],
    ),
    "video range short of episode length": (
        "v3.0+video",
        "meta/episodes/chunk-000/file-000.parquet",
        _late_start,
        ["file-000.mp4", "observation.images.top", "episode 1", "expected 14 frames", "found 13"],
    ),
    "nan action": (
        "v2.1",
        V21_EP1,
        _nan_action,
        ["episode_000001.parquet", "'action'", "finite", "nan", "frame 5"],
    ),
    "inf action": (
        "v3.0",
        "data/chunk-000/file-000.parquet",
        _inf_action,
        ["file-000.parquet", "'action'", "inf"],
    ),
    "wrong shape": (
        "v2.1",
        "meta/info.json",
        lambda p: _set_feature_shape(p.parents[1]),
        ["episode_000000.parquet", "'action'", "shape [7]", "found [3]"],
    ),
    "non-monotonic timestamps": (
        "v3.0",
        "data/chunk-000/file-000.parquet",
        _swap_timestamps,
        ["file-000.parquet", "'timestamp'", "not increasing", "frame 3"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_clear_error_and_no_destination(tmp_path, case):
    version, rel, damage, words = BAD_INPUTS[case]
    root = tmp_path / "ds"
    if version == "v2.1":
        make_v21(root, lengths=(12, 15, 9))
    elif version == "v3.0+video":
        make_v30(root, cameras={"top": (64, 64)}, lengths=(10, 14, 8, 11), episodes_per_file=10)
    else:
        make_v30(root, cameras={}, episodes_per_file=10)
    damage(root / rel)
    dest = tmp_path / "out" / "bad.zarr"
    with pytest.raises(IngestError) as err:
        L.ingest(root, dest, progress=False)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{case}: {w!r} not in {msg!r}"
    assert not dest.exists()
    assert not (dest.parent.exists() and _no_leftovers(dest.parent))


def test_total_frames_disagreeing_with_info_is_an_error(tmp_path):
    make_v30(tmp_path / "ds", cameras={})
    info = json.loads((tmp_path / "ds/meta/info.json").read_text())
    info["total_frames"] += 1
    (tmp_path / "ds/meta/info.json").write_text(json.dumps(info))
    with pytest.raises(
        IngestError, match=r"info.json: key 'total_frames' says \d+, the episode tables hold \d+"
    ):
        L.ingest(tmp_path / "ds", tmp_path / "x.zarr", progress=False)


# ------------------------------------------------------------------------------------ format helpers
def test_image_stats_from_histogram_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (20, 16, 12, 3), dtype=np.uint8)
    x[..., 1] //= 3
    s = F.image_stats(x)
    px = x.reshape(-1, 3) / 255.0
    assert s["mean"].shape == (3, 1, 1) and s["count"].tolist() == [20]
    assert np.allclose(s["mean"].ravel(), px.mean(0)) and np.allclose(s["std"].ravel(), px.std(0))
    assert np.array_equal(s["min"].ravel(), px.min(0)) and np.array_equal(s["max"].ravel(), px.max(0))
    for q, name in ((0.01, "q01"), (0.99, "q99")):
        assert np.array_equal(s[name].ravel(), np.quantile(px, q, axis=0, method="inverted_cdf"))


def test_column_to_numpy_lists_and_errors():
    import pyarrow as pa

    var = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))
    assert np.array_equal(
        F.column_to_numpy(var.slice(1), (2,), "float32", where="f", name="a"), [[3, 4], [5, 6]]
    )
    nested = pa.array([[[1, 2], [3, 4]]] * 2, pa.list_(pa.list_(pa.int64(), 2), 2))
    assert F.column_to_numpy(nested, (2, 2), "int64", where="f", name="k").shape == (2, 2, 2)
    with pytest.raises(
        IngestError, match=r"f: column 'a': rows have different lengths \(2 in the first row, 1"
    ):
        F.column_to_numpy(pa.array([[1.0, 2.0], [3.0]]), (2,), "float32", where="f", name="a")
    with pytest.raises(IngestError, match=r"column 'a': info.json says shape \[3\], found \[2\]"):
        F.column_to_numpy(var, (3,), "float32", where="f", name="a")
    with pytest.raises(IngestError, match="column 'a' has 1 null"):
        F.column_to_numpy(pa.array([[1.0, 2.0], None]), (2,), "float32", where="f", name="a")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import vlaflow.data.lerobot_export as X

    _make_store(tmp_path / "s.zarr")
    calls, real_write = [], X.VideoWriter.write

    def failing_write(self, frames):  # the second episode's video write fails
        calls.append(len(frames))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(self, frames)

    monkeypatch.setattr(X.VideoWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_lerobot(tmp_path / "s.zarr", tmp_path / "lr", progress=False)
    assert len(calls) == 2 and not (tmp_path / "lr").exists() and not _no_leftovers(tmp_path)
