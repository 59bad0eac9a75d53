"""Write an episode store as a LeRobot v3.0 dataset (layout: :mod:`vlaflow.data.lerobot_format`).

Keys map back to LeRobot names (``action``, ``observation.state``, ``observation.images.<cam>``,
``observation.<x>``). Cameras become mp4 videos, episodes concatenated in a file, each episode's
``[from_timestamp, to_timestamp)`` recorded in the episode table; data rows go to parquet files that
roll over at ``data_files_size_in_mb`` (videos at ``video_files_size_in_mb``), ``chunks_size`` files per
chunk folder. meta/stats.json holds min/max/mean/std/count and q01/q99 for every feature (images per
channel in [0, 1], from a subsample of frames, as LeRobot does), and the episode table holds the same
per episode under ``stats/<feature>/<stat>``.

The dataset is written to a temporary directory beside ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import vlaflow.keys as K
from vlaflow.atomic import check_destination, replace_directory, restore_aside, temp_sibling
from vlaflow.data import lerobot_format as F
from vlaflow.data.video import CODECS, VideoWriter, encoder_for
from vlaflow.errors import VlaflowError

_MB = 1024 * 1024
_ROWS_PER_WRITE = 65536  # rows buffered before a parquet row group is written


def _arrow_column(x: np.ndarray, shape: tuple[int, ...]) -> pa.Array:
    """(T, *shape) numpy -> a scalar column for shape (1,)/(), else nested fixed_size_list columns."""
    if shape in ((), (1,)):
        return pa.array(x.reshape(len(x)))
    arr: pa.Array = pa.array(np.ascontiguousarray(x).reshape(-1))
    for size in reversed(shape):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(size))
    return arr


def _chunk_file(i: int, chunks_size: int) -> tuple[int, int]:
    return i // chunks_size, i % chunks_size


class _DataWriter:
    """Data rows into data/chunk-XXX/file-XXX.parquet, a new file once one reaches the size limit."""

    def __init__(self, root: Path, schema: pa.Schema, limit_mb: float, chunks_size: int):
        self.root, self.schema, self.limit, self.chunks_size = root, schema, limit_mb * _MB, chunks_size
        self.n_files = 0
        self.file_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.buffer: list[pa.Table] = []

    def location(self, next_bytes: int) -> tuple[int, int]:
        """(chunk_index, file_index) the next episode goes to, rolling over when the current file is full."""
        if self.writer is not None and self.file_bytes and self.file_bytes + next_bytes > self.limit:
            self._close_file()
        if self.writer is None:
            c, f = _chunk_file(self.n_files, self.chunks_size)
            path = self.root / F.V3_DATA_PATH.format(chunk_index=c, file_index=f)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema, compression="snappy")
            self.n_files += 1
            self.file_bytes = 0
        return _chunk_file(self.n_files - 1, self.chunks_size)

    def write(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.file_bytes += table.nbytes
        if sum(t.num_rows for t in self.buffer) >= _ROWS_PER_WRITE:
            self._flush()

    def _flush(self) -> None:
        if self.buffer and self.writer is not None:
            self.writer.write_table(pa.concat_tables(self.buffer))
        self.buffer = []

    def _close_file(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
        self.writer = None

    def close(self) -> None:
        self._close_file()


class _VideoFiles:
    """One camera's mp4 files: episodes appended to the current file until it reaches the size limit."""

    def __init__(
        self, root: Path, name: str, fps: float, hw: tuple[int, int], codec: str, limit_mb: float, chunks: int
    ):
        self.root, self.name, self.fps, self.hw, self.codec = root, name, fps, hw, codec
        self.limit, self.chunks_size = limit_mb * _MB, chunks
        self.n_files = 0
        self.writer: VideoWriter | None = None

    def append(self, frames: np.ndarray) -> tuple[int, int, float, float]:
        """Encode one episode; returns (chunk_index, file_index, from_timestamp, to_timestamp)."""
        if self.writer is not None and self.writer.bytes_written >= self.limit:
            self.writer.close()
            self.writer = None
        if self.writer is None:
            c, f = _chunk_file(self.n_files, self.chunks_size)
            path = self.root / F.V3_VIDEO_PATH.format(video_key=self.name, chunk_index=c, file_index=f)
            self.writer = VideoWriter(path, self.fps, self.hw[1], self.hw[0], self.codec)
            self.n_files += 1
        t0 = self.writer.duration_s
        self.writer.write(frames)
        c, f = _chunk_file(self.n_files - 1, self.chunks_size)
        return c, f, t0, self.writer.duration_s

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _features(store, fps: float, video_codec: str, pix_fmt: str) -> dict[str, dict]:
    features: dict[str, dict] = {}
    for key, spec in store.keys.items():
        name = F.to_lerobot_name(key)
        if K.is_image(key):
            h, w = spec.shape[:2]
            features[name] = {
                "dtype": "video",
                "shape": [h, w, 3],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": CODECS[video_codec].family,
                    "video.pix_fmt": pix_fmt,
                    "video.is_depth_map": False,
                    "video.fps": fps,
                    "video.channels": 3,
                    "has_audio": False,
                },
            }
        else:
            shape = list(spec.shape) or [1]
            names = list(spec.names) if spec.names and len(spec.shape) == 1 else None
            features[name] = {"dtype": spec.dtype, "shape": shape, "names": names}
    return {**features, **json.loads(json.dumps(F.BOOKKEEPING_FEATURES))}


def _stats_columns(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    for name in per_episode[0]:
        for stat in per_episode[0][name]:
            cols[f"stats/{name}/{stat}"] = pa.array([np.asarray(e[name][stat]).tolist() for e in per_episode])
    return cols


def export_lerobot(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fps: float | None = None,
    video_codec: str = "h264",
    overwrite: bool = False,
    progress: bool = True,
    data_files_size_in_mb: float = F.DEFAULT_DATA_FILE_MB,
    video_files_size_in_mb: float = F.DEFAULT_VIDEO_FILE_MB,
    chunks_size: int = F.DEFAULT_CHUNKS_SIZE,
) -> dict[str, Any]:
    """Write the store at ``store_path`` as a LeRobot v3.0 dataset in ``out_dir``; returns a summary.

    ``video_codec``: "h264" (libx264, yuv420p), "av1" (SVT-AV1, yuv420p) or "h264-lossless" (libx264rgb
    at qp 0: decoded frames equal the store's exactly). ``fps`` is needed only for stores without one.
    """
    from vlaflow.data.store import EpisodeStore

    store = EpisodeStore.open(store_path)
    if store.n_episodes == 0:
        raise VlaflowError(f"{store_path}: the store has no finished episodes to export")
    if store.fps is None and fps is None:
        raise VlaflowError(f"{store_path}: the store records no fps; pass fps=")
    if store.fps is not None and fps is not None and abs(store.fps - fps) > 1e-9:
        raise VlaflowError(f"{store_path}: the store's fps is {store.fps:g}, fps={fps:g} disagrees with it")
    rate = float(store.fps or fps)
    fps_out: float | int = int(rate) if rate.is_integer() else rate
    encoder, choice = encoder_for(video_codec)
    out = Path(out_dir).absolute()
    restore_aside(out)  # an export a killed replacement left aside is the existing output again
    check_destination(out, overwrite=True, sources={"the store": store_path})
    if out.exists() and not overwrite:
        raise VlaflowError(f"{out_dir}: output exists (pass overwrite=True / --overwrite to replace it)")
    image_keys = [k for k in store.keys if K.is_image(k)]
    data_keys = [k for k in store.keys if not K.is_image(k)]
    for k in image_keys:
        h, w = store.keys[k].shape[:2]
        if choice.even_dims and (h % 2 or w % 2):
            raise VlaflowError(
                f"{store_path}: key {k!r} is {h}x{w}; {video_codec} ({choice.pix_fmt}) needs even sizes, "
                "use video_codec='h264-lossless'"
            )
    pix_fmt = "gbrp" if choice.pix_fmt == "rgb24" else choice.pix_fmt  # what decoders report
    features = _features(store, fps_out, video_codec, pix_fmt)
    names = {k: F.to_lerobot_name(k) for k in store.keys}

    fields = []
    for k in data_keys:
        spec = store.keys[k]
        fields.append(
            pa.field(names[k], _arrow_column(np.zeros((1, *spec.shape), spec.dtype), spec.shape).type)
        )
    for b, t in (("timestamp", pa.float32()), *((c, pa.int64()) for c in F.BOOKKEEPING[1:])):
        fields.append(pa.field(b, t))
    data_features = {n: ft for n, ft in features.items() if ft["dtype"] != "video"}
    schema = pa.schema(fields, metadata={b"huggingface": F.hf_features_metadata(data_features)})

    tmp = temp_sibling(out)
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    ep_stats: list[dict[str, dict[str, np.ndarray]]] = []
    data_w = _DataWriter(tmp, schema, data_files_size_in_mb, chunks_size)
    videos = {
        k: _VideoFiles(
            tmp, names[k], rate, store.keys[k].shape[:2], video_codec, video_files_size_in_mb, chunks_size
        )
        for k in image_keys
    }
    try:
        start = 0
        lengths = store.episode_lengths
        for i in tqdm(range(store.n_episodes), desc="export-lerobot", unit="ep", disable=not progress):
            ep = store.get_episode(i)
            task = store.episode_meta(i)["task"]
            ti = tasks.setdefault(task, len(tasks))
            n = int(lengths[i])
            frame_index = np.arange(n, dtype=np.int64)
            book = {
                "timestamp": (frame_index / rate).astype(np.float32),
                "frame_index": frame_index,
                "episode_index": np.full(n, i, np.int64),
                "index": np.arange(start, start + n, dtype=np.int64),
                "task_index": np.full(n, ti, np.int64),
            }
            cols = {names[k]: _arrow_column(ep[k], store.keys[k].shape) for k in data_keys}
            cols.update({b: pa.array(v) for b, v in book.items()})
            table = pa.Table.from_pydict(cols, schema=schema)
            chunk, file = data_w.location(table.nbytes)
            data_w.write(table)
            row: dict[str, Any] = {
                "episode_index": i,
                "tasks": [task],
                "length": n,
                "data/chunk_index": chunk,
                "data/file_index": file,
                "dataset_from_index": start,
                "dataset_to_index": start + n,
            }
            stats = {
                names[k]: F.array_stats(ep[k].reshape(n, *(store.keys[k].shape or (1,)))) for k in data_keys
            }
            for k in image_keys:
                frames = ep[k] if ep[k].shape[-1] == 3 else np.repeat(ep[k], 3, axis=-1)
                c, f, t0, t1 = videos[k].append(frames)
                row.update(
                    {
                        f"videos/{names[k]}/chunk_index": c,
                        f"videos/{names[k]}/file_index": f,
                        f"videos/{names[k]}/from_timestamp": t0,
                        f"videos/{names[k]}/to_timestamp": t1,
                    }
                )
                stats[names[k]] = F.image_stats(frames)
            stats.update({b: F.array_stats(v[:, None]) for b, v in book.items()})
            rows.append(row)
            ep_stats.append(stats)
            start += n
        data_w.close()
        for v in videos.values():
            v.close()

        ep_cols = {c: pa.array([r[c] for r in rows]) for c in rows[0]}
        ep_cols["tasks"] = pa.array([r["tasks"] for r in rows], pa.list_(pa.string()))
        ep_cols.update(_stats_columns(ep_stats))
        ep_cols["meta/episodes/chunk_index"] = pa.array(np.zeros(len(rows), np.int64))
        ep_cols["meta/episodes/file_index"] = pa.array(np.zeros(len(rows), np.int64))
        ep_path = tmp / F.V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(ep_cols), ep_path)
        pq.write_table(F.tasks_table(list(tasks)), tmp / F.TASKS_PARQUET)

        total = {name: F.merge_stats([s[name] for s in ep_stats]) for name in ep_stats[0]}
        (tmp / F.STATS_PATH).write_text(json.dumps(F.stats_to_json(total), indent=4))
        attrs = store.attrs.get("lerobot", {}) if isinstance(store.attrs.get("lerobot"), dict) else {}
        info = {
            "codebase_version": "v3.0",
            "robot_type": attrs.get("robot_type"),
            "total_episodes": store.n_episodes,
            "total_frames": start,
            "total_tasks": len(tasks),
            "chunks_size": chunks_size,
            "data_files_size_in_mb": data_files_size_in_mb,
            "video_files_size_in_mb": video_files_size_in_mb,
            "fps": fps_out,
            "splits": {"train": f"0:{store.n_episodes}"},
            "data_path": F.V3_DATA_PATH,
            "video_path": F.V3_VIDEO_PATH if image_keys else None,
            "features": features,
        }
        (tmp / F.INFO_PATH).write_text(json.dumps(info, indent=4, ensure_ascii=False))
        replace_directory(tmp, out)  # the old export (overwrite) is swapped out only now, never deleted first
    finally:
        # On success these are already closed; after an error, closing must not mask it.
        with contextlib.suppress(Exception):
            data_w.close()
        for v in videos.values():
            with contextlib.suppress(Exception):
                v.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out_dir": str(out),
        "codebase_version": "v3.0",
        "n_episodes": store.n_episodes,
        "n_frames": start,
        "fps": fps_out,
        "video_codec": video_codec,
        "encoder": encoder if image_keys else None,
        "cameras": [names[k] for k in image_keys],
        "data_files": data_w.n_files,
        "video_files": {names[k]: videos[k].n_files for k in image_keys},
        "tasks": list(tasks),
    }
