"""Builders of small LeRobot datasets (v2.1 and v3.0) that follow the published layout, for tests.

Written independently of vlaflow's importer/exporter (pyarrow and PyAV directly), so that a test
checks our reader against the spec, not against our own writer. Each builder returns what it wrote:
{"episodes": [{"action", "state", "frames": {camera: (T, H, W, 3)}, "task"}], "fps", ...}.
"""

from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, no banner per stream

import av  # noqa: E402
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TASKS = ["pick up the red block", "push the button"]


def synthetic_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus a 16x16 block moving on an 8-px grid; (n, h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 // max(w - 1, 1), yy * 200 // max(h - 1, 1), (xx + yy) * 100 // (h + w)], -1)
    out = np.empty((n, h, w, 3), np.uint8)
    color = rng.integers(60, 250, 3)
    for i in range(n):
        img = base.copy()
        img[..., 2] += (i * 3) % 50
        y0 = 8 * ((i // 2) % max(1, (h - 16) // 8))
        x0 = 8 * ((seed + i) % max(1, (w - 16) // 8))
        img[y0 : y0 + 16, x0 : x0 + 16] = color
        out[i] = np.clip(img, 0, 255)
    return out


def encode_mp4(path: Path, frames: np.ndarray, fps: int, codec: str = "libx264") -> None:
    """Encode frames at pts = i (time i / fps) in yuv420p, GOP 2, as LeRobot does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = {"g": "2", "crf": "20" if codec == "libx264" else "30"}
    if codec == "libsvtav1":
        opts["preset"] = "10"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.time_base = Fraction(1, fps)
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _episodes(n_episodes, lengths, action_dim, state_dim, cameras, seed):
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(n_episodes):
        t = lengths[e % len(lengths)]
        eps.append(
            {
                "action": rng.normal(size=(t, action_dim)).astype(np.float32),
                "state": rng.normal(size=(t, state_dim)).astype(np.float32),
                "frames": {
                    cam: synthetic_frames(t, h, w, seed=e * 7 + j)
                    for j, (cam, (h, w)) in enumerate(cameras.items())
                },
                "task": TASKS[e % len(TASKS)],
                "task_index": e % len(TASKS),
            }
        )
    return eps


def _features(action_dim, state_dim, cameras, fps, codec_name):
    ft = {
        "action": {"dtype": "float32", "shape": [action_dim], "names": [f"a{i}" for i in range(action_dim)]},
        "observation.state": {
            "dtype": "float32",
            "shape": [state_dim],
            "names": [f"q{i}" for i in range(state_dim)],
        },
    }
    for cam, (h, w) in cameras.items():
        ft[f"observation.images.{cam}"] = {
            "dtype": "video",
            "shape": [h, w, 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": h,
                "video.width": w,
                "video.codec": codec_name,
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": 3,
                "has_audio": False,
            },
        }
    ft.update(
        {
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
    )
    return ft


def _data_table(ep: dict, e: int, start: int, fps: int) -> pa.Table:
    t = len(ep["action"])
    fixed = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])  # noqa: E731
    return pa.table(
        {
            "action": fixed(ep["action"]),
            "observation.state": fixed(ep["state"]),
            "timestamp": pa.array((np.arange(t) / fps).astype(np.float32)),
            "frame_index": pa.array(np.arange(t, dtype=np.int64)),
            "episode_index": pa.array(np.full(t, e, np.int64)),
            "index": pa.array(np.arange(start, start + t, dtype=np.int64)),
            "task_index": pa.array(np.full(t, ep["task_index"], np.int64)),
        }
    )


def _png_column(frames: np.ndarray) -> pa.Array:
    from PIL import Image

    items = []
    for img in frames:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        items.append({"bytes": buf.getvalue(), "path": None})
    return pa.array(items, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _stats(x: np.ndarray) -> dict:
    x = x.reshape(len(x), -1).astype(np.float64)
    return {
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "count": [len(x)],
    }


def make_v21(
    root: Path,
    *,
    n_episodes: int = 3,
    lengths: tuple[int, ...] = (12, 15, 9),
    fps: int = 10,
    cameras: dict[str, tuple[int, int]] | None = None,
    action_dim: int = 3,
    state_dim: int = 4,
    chunks_size: int = 1000,
    image_cameras: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
) -> dict:
    """A LeRobot v2.1 dataset: one parquet and one H.264 mp4 (per camera) per episode.

    ``image_cameras`` are stored the other way LeRobot allows: dtype "image", PNG bytes inside the
    parquet (the ``datasets`` Image struct {bytes, path}).
    """
    cameras = {"front": (64, 64)} if cameras is None else cameras
    image_cameras = image_cameras or {}
    eps = _episodes(n_episodes, lengths, action_dim, state_dim, {**cameras, **image_cameras}, seed)
    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    (root / "meta").mkdir(parents=True, exist_ok=True)
    start, ep_lines, stat_lines = 0, [], []
    for e, ep in enumerate(eps):
        chunk = e // chunks_size
        path = root / data_path.format(episode_chunk=chunk, episode_index=e)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _data_table(ep, e, start, fps)
        for cam in image_cameras:
            table = table.append_column(f"observation.images.{cam}", _png_column(ep["frames"][cam]))
        pq.write_table(table, path)
        for cam in cameras:
            frames = ep["frames"][cam]
            key = f"observation.images.{cam}"
            encode_mp4(
                root / video_path.format(episode_chunk=chunk, video_key=key, episode_index=e), frames, fps
            )
        t = len(ep["action"])
        ep_lines.append({"episode_index": e, "tasks": [ep["task"]], "length": t})
        stat_lines.append(
            {
                "episode_index": e,
                "stats": {"action": _stats(ep["action"]), "observation.state": _stats(ep["state"])},
            }
        )
        start += t
    info = {
        "codebase_version": "v2.1",
        "robot_type": "test_arm",
        "total_episodes": n_episodes,
        "total_frames": start,
        "total_tasks": len(TASKS),
        "total_videos": n_episodes * len(cameras),
        "total_chunks": (n_episodes - 1) // chunks_size + 1,
        "chunks_size": chunks_size,
        "fps": fps,
        "splits": {"train": f"0:{n_episodes}"},
        "data_path": data_path,
        "video_path": video_path if cameras else None,
        "features": _features(action_dim, state_dim, cameras, fps, "h264"),
    }
    for cam, (h, w) in image_cameras.items():
        info["features"][f"observation.images.{cam}"] = {
            "dtype": "image",
            "shape": [h, w, 3],
            "names": ["height", "width", "channel"],
        }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ep_lines))
    (root / "meta/episodes_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stat_lines))
    (root / "meta/tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
    )
    return {"episodes": eps, "fps": fps, "n_frames": start}


def make_v30(
    root: Path,
    *,
    n_episodes: int = 4,
    lengths: tuple[int, ...] = (10, 14, 8, 11),
    fps: int = 15,
    cameras: dict[str, tuple[int, int]] | None = None,
    action_dim: int = 2,
    state_dim: int = 5,
    episodes_per_file: int = 3,
    codec: str = "libsvtav1",
    seed: int = 1,
) -> dict:
    """A LeRobot v3.0 dataset: episodes concatenated in data/video files, ``episodes_per_file`` per file."""
    cameras = {"top": (64, 96), "wrist": (64, 64)} if cameras is None else cameras
    eps = _episodes(n_episodes, lengths, action_dim, state_dim, cameras, seed)
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    rows: dict[str, list] = {
        k: []
        for k in [
            "episode_index",
            "tasks",
            "length",
            "data/chunk_index",
            "data/file_index",
            "dataset_from_index",
            "dataset_to_index",
        ]
    }
    start = 0
    for f0 in range(0, n_episodes, episodes_per_file):
        file_index = f0 // episodes_per_file
        group = list(range(f0, min(n_episodes, f0 + episodes_per_file)))
        tables, t_in_file = [], 0
        for e in group:
            ep = eps[e]
            t = len(ep["action"])
            tables.append(_data_table(ep, e, start, fps))
            rows["episode_index"].append(e)
            rows["tasks"].append([ep["task"]])
            rows["length"].append(t)
            rows["data/chunk_index"].append(0)
            rows["data/file_index"].append(file_index)
            rows["dataset_from_index"].append(start)
            rows["dataset_to_index"].append(start + t)
            for cam in cameras:
                key = f"observation.images.{cam}"
                for col, val in (
                    ("chunk_index", 0),
                    ("file_index", file_index),
                    ("from_timestamp", t_in_file / fps),
                    ("to_timestamp", (t_in_file + t) / fps),
                ):
                    rows.setdefault(f"videos/{key}/{col}", []).append(val)
            start += t
            t_in_file += t
        path = root / data_path.format(chunk_index=0, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables), path)
        for cam in cameras:
            frames = np.concatenate([eps[e]["frames"][cam] for e in group])
            key = f"observation.images.{cam}"
            encode_mp4(
                root / video_path.format(video_key=key, chunk_index=0, file_index=file_index),
                frames,
                fps,
                codec,
            )
    n = len(rows["episode_index"])
    rows["meta/episodes/chunk_index"] = [0] * n
    rows["meta/episodes/file_index"] = [0] * n
    ep_table = pa.table({**rows, "tasks": pa.array(rows["tasks"], pa.list_(pa.string()))})
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(ep_table, root / "meta/episodes/chunk-000/file-000.parquet")
    # pandas' DataFrame({"task_index": ...}, index=tasks).to_parquet(): the text is the (unnamed) index
    tasks = pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()), "__index_level_0__": TASKS})
    tasks = tasks.replace_schema_metadata(
        {b"pandas": json.dumps({"index_columns": ["__index_level_0__"], "columns": []}).encode()}
    )
    pq.write_table(tasks, root / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": "test_arm",
        "total_episodes": n_episodes,
        "total_frames": start,
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps,
        "splits": {"train": f"0:{n_episodes}"},
        "data_path": data_path,
        "video_path": video_path if cameras else None,
        "features": _features(action_dim, state_dim, cameras, fps, "av1" if "av1" in codec else "h264"),
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return {"episodes": eps, "fps": fps, "n_frames": start}


def rewrite_parquet(path: Path, column: str, fn) -> None:
    """Replace one column of a parquet file by ``fn(numpy values) -> numpy values`` (same row count)."""
    table = pq.read_table(path)
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        size = col.type.list_size
        vals = fn(col.flatten().to_numpy().reshape(len(col), size).copy())
        new = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), size)
    else:
        new = pa.array(fn(col.to_numpy().copy()))
    table = table.set_column(table.schema.get_field_index(column), column, new)
    pq.write_table(table, path)
