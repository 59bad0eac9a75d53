"""LeRobot dataset layouts (v2.1 and v3.0), shared by the importer and the exporter.

Written from LeRobot's published layout (lerobot/datasets/utils.py, lerobot_dataset.py, the v3.0
conversion script); lerobot itself is not a dependency.

v3.0 (many episodes per file)::

    meta/info.json                      codebase_version "v3.0", fps, features, data_path, video_path,
                                        chunks_size, data_files_size_in_mb, video_files_size_in_mb, totals
    meta/stats.json                     {feature: {min, max, mean, std, count, q01, ...}}
    meta/tasks.parquet                  column task_index, pandas index = task text
    meta/episodes/chunk-000/file-000.parquet
                                        episode_index, tasks (list of text), length,
                                        data/chunk_index, data/file_index,
                                        dataset_from_index, dataset_to_index,
                                        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp},
                                        stats/<feature>/<stat>, meta/episodes/{chunk_index, file_index}
    data/chunk-000/file-000.parquet     one row per frame: features + timestamp, frame_index, episode_index,
                                        index, task_index
    videos/<key>/chunk-000/file-000.mp4 episodes concatenated; an episode is [from_timestamp, to_timestamp)

v2.1 (one file per episode)::

    meta/info.json                      data_path "data/chunk-{episode_chunk:03d}/episode_{...:06d}.parquet"
                                        video_path "videos/chunk-{...}/{video_key}/episode_{...}.mp4"
    meta/episodes.jsonl                 {"episode_index", "tasks": [text], "length"}
    meta/tasks.jsonl                    {"task_index", "task"}
    meta/episodes_stats.jsonl           {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import vlaflow.keys as K
from vlaflow.errors import IngestError

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PARQUET = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
LEGACY_EPISODES = "meta/episodes.jsonl"
LEGACY_TASKS = "meta/tasks.jsonl"
LEGACY_EPISODES_STATS = "meta/episodes_stats.jsonl"

V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"

DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILE_MB = 100
DEFAULT_VIDEO_FILE_MB = 500

# Per-frame bookkeeping columns: checked, never stored as data keys.
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
BOOKKEEPING_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

LR_ACTION = "action"
LR_STATE = K.to_lerobot(K.OBS_STATE)
LR_IMAGES = K.LEROBOT_IMAGES_PREFIX
LR_SINGLE_IMAGE = K.LEROBOT_SINGLE_IMAGE  # older single-camera datasets (e.g. lerobot/pusht)
SINGLE_CAMERA = K.LEROBOT_SINGLE_CAMERA


# ---------------------------------------------------------------------------------------------- key mapping
def to_store_key(name: str) -> str:
    """LeRobot feature name -> vlaflow store key (the alias map of :mod:`vlaflow.keys`)."""
    return K.from_lerobot(name)


def to_lerobot_name(key: str) -> str:
    """vlaflow store key -> LeRobot feature name (inverse of :func:`to_store_key`)."""
    if key in BOOKKEEPING:
        raise IngestError(f"store key {key!r} collides with LeRobot's bookkeeping column of the same name")
    return K.to_lerobot(key)


def image_hwc(name: str, feature: Mapping[str, Any]) -> tuple[int, int, int]:
    """(height, width, channels) of an image/video feature, whether declared HWC or CHW."""
    shape = [int(s) for s in feature.get("shape", [])]
    if len(shape) != 3:
        raise IngestError(f"{INFO_PATH}: feature {name!r}: expected a 3-D image shape, found {shape}")
    names = feature.get("names") or []
    if len(names) == 3 and str(names[0]).startswith("channel"):
        return shape[1], shape[2], shape[0]
    return shape[0], shape[1], shape[2]


# ---------------------------------------------------------------------------------------------- reading files
def read_json(path: Path) -> Any:
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise IngestError(f"{path}: line {i} is not valid JSON ({e})") from e
    return rows


def parquet_schema(path: Path) -> pa.Schema:
    """The schema from a parquet footer; a truncated or corrupt file is an IngestError naming it."""
    if not path.is_file():
        raise IngestError(f"{path}: parquet file not found")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from e


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    schema = parquet_schema(path)
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise IngestError(f"{path}: missing columns {missing}; found {schema.names}")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: cannot read parquet data (truncated or corrupt?): {e}") from e


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def column_to_numpy(
    col: pa.ChunkedArray | pa.Array, shape: Sequence[int], dtype: str, *, where: str, name: str
) -> np.ndarray:
    """A (possibly nested) list column -> (rows, *shape) numpy, vectorised (flatten + reshape).

    Scalar columns are accepted for shape (1,). Raises IngestError naming file and column on nulls,
    ragged rows or a per-row shape that disagrees with ``shape`` (info.json).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    dims: list[int] = []
    while True:
        if arr.null_count:
            raise IngestError(f"{where}: column {name!r} has {arr.null_count} null values")
        if not _is_list(arr.type):
            break
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
        else:
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            size = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and (lengths != size).any():
                bad = int(np.flatnonzero(lengths != size)[0])
                raise IngestError(
                    f"{where}: column {name!r}: rows have different lengths ({size} in the first row, "
                    f"{int(lengths[bad])} in row {bad}); info.json says shape {list(shape)}"
                )
        dims.append(size)
        arr = arr.flatten()
    expected = tuple(int(s) for s in shape)
    found = tuple(dims) if dims else (1,)
    if found != expected:
        raise IngestError(
            f"{where}: column {name!r}: info.json says shape {list(expected)}, found {list(found)}"
        )
    try:
        values = arr.to_numpy(zero_copy_only=False)
    except pa.ArrowException as e:
        raise IngestError(f"{where}: column {name!r}: cannot convert {arr.type} to numbers ({e})") from e
    if values.dtype.kind not in "biuf":
        raise IngestError(f"{where}: column {name!r}: expected numeric values ({dtype}), found {arr.type}")
    return values.reshape(n, *expected).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------- tasks
def read_tasks_parquet(path: Path) -> dict[int, str]:
    """task_index -> text from meta/tasks.parquet (pandas writes the text as the frame's index)."""
    table = read_parquet(path)
    names = table.schema.names
    text_col = None
    meta = table.schema.metadata or {}
    if b"pandas" in meta:
        try:
            for c in json.loads(meta[b"pandas"]).get("index_columns", []):
                if isinstance(c, str) and c in names and pa.types.is_string(table.schema.field(c).type):
                    text_col = c
        except json.JSONDecodeError:
            pass
    if text_col is None:
        for c in ("task", "__index_level_0__"):
            if c in names:
                text_col = c
    if "task_index" not in names or text_col is None:
        raise IngestError(
            f"{path}: expected columns task_index and the task text (index or 'task'), found {names}"
        )
    idx = table.column("task_index").to_pylist()
    text = table.column(text_col).to_pylist()
    return {int(i): str(t) for i, t in zip(idx, text, strict=True)}


def tasks_table(tasks: Sequence[str]) -> pa.Table:
    """meta/tasks.parquet as pandas would write ``DataFrame({"task_index": ...}, index=tasks)``."""
    table = pa.table(
        {"task_index": pa.array(range(len(tasks)), pa.int64()), "__index_level_0__": list(tasks)}
    )
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def hf_features_metadata(features: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The ``huggingface`` schema metadata ``datasets`` writes, so it restores list lengths and dtypes."""
    out = {}
    for name, ft in features.items():
        if ft["dtype"] in ("video", "image"):
            continue
        shape = list(ft["shape"])
        value: dict[str, Any] = {"dtype": ft["dtype"], "_type": "Value"}
        if shape == [1]:
            out[name] = value
            continue
        for size in reversed(shape):
            value = {"feature": value, "length": int(size), "_type": "List"}
        out[name] = value
    return json.dumps({"info": {"features": out}}).encode()


# ---------------------------------------------------------------------------------------------- statistics
def array_stats(x: np.ndarray, quantiles: bool = True) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics over axis 0: min, max, mean, std, count (+ q01, q99)."""
    x = np.asarray(x)
    xf = x.astype(np.float64)
    out = {
        "min": x.min(axis=0),
        "max": x.max(axis=0),
        "mean": xf.mean(axis=0),
        "std": xf.std(axis=0),
        "count": np.array([x.shape[0]], np.int64),
    }
    if quantiles:
        q = np.quantile(xf, [0.01, 0.99], axis=0)
        out["q01"], out["q99"] = q[0], q[1]
    return out


def image_stats(frames: np.ndarray, max_frames: int = 100, max_side: int = 150) -> dict[str, np.ndarray]:
    """Per-channel statistics of uint8 (T, H, W, C) frames in [0, 1], shaped (C, 1, 1) as LeRobot stores them.

    Like LeRobot, a subsample of frames (evenly spaced) and pixels (strided to about ``max_side``) is used.
    uint8 values make a 256-bin histogram exact, so every statistic (quantiles included) comes from it.
    """
    t, h, w, c = frames.shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    step = max(1, max(h, w) // max_side)
    sub = frames[idx, ::step, ::step].reshape(-1, c)
    hist = np.stack([np.bincount(sub[:, ch], minlength=256) for ch in range(c)]).astype(
        np.float64
    )  # (C, 256)
    levels = np.arange(256) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ levels / n
    std = np.sqrt(np.maximum(hist @ levels**2 / n - mean**2, 0.0))
    cdf = np.cumsum(hist, axis=1) / n[:, None]
    present = hist > 0
    shape = (c, 1, 1)
    return {
        "min": (present.argmax(axis=1) / 255.0).reshape(shape),
        "max": ((255 - present[:, ::-1].argmax(axis=1)) / 255.0).reshape(shape),
        "mean": mean.reshape(shape),
        "std": std.reshape(shape),
        "count": np.array([len(idx)], np.int64),
        "q01": (np.argmax(cdf >= 0.01, axis=1) / 255.0).reshape(shape),
        "q99": (np.argmax(cdf >= 0.99, axis=1) / 255.0).reshape(shape),
    }


def merge_stats(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-episode statistics into dataset statistics (count-weighted mean and pooled variance).

    Quantiles are combined as count-weighted means of the episodes' quantiles, as LeRobot does.
    """
    counts = np.array([float(p["count"][0]) for p in parts])
    w = counts / counts.sum()
    mean = sum(wi * np.asarray(p["mean"], np.float64) for wi, p in zip(w, parts, strict=True))
    var = sum(
        wi * (np.asarray(p["std"], np.float64) ** 2 + (np.asarray(p["mean"], np.float64) - mean) ** 2)
        for wi, p in zip(w, parts, strict=True)
    )
    out = {
        "min": np.min(np.stack([p["min"] for p in parts]), axis=0),
        "max": np.max(np.stack([p["max"] for p in parts]), axis=0),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(counts.sum())], np.int64),
    }
    for q in ("q01", "q99"):
        if all(q in p for p in parts):
            out[q] = sum(wi * np.asarray(p[q], np.float64) for wi, p in zip(w, parts, strict=True))
    return out


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}
