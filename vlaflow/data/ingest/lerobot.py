"""LeRobot datasets, v2.1 (one parquet + one mp4 per episode and camera) and v3.0 (many episodes per file).

Layouts: :mod:`vlaflow.data.lerobot_format`. Keys: ``action`` -> ``action``, ``observation.state`` ->
``obs.state``, ``observation.images.<cam>`` (video or image feature) -> ``obs.image.<cam>`` (uint8 HWC),
other ``observation.<x>`` -> ``obs.<x>``, anything else keeps its name. ``timestamp``, ``frame_index``,
``episode_index``, ``index`` and ``task_index`` are bookkeeping: checked (monotone timestamps, frame
counts, known tasks), not stored. The episode's task texts become its instruction.

Everything that can be checked without decoding (info.json, episode tables, parquet footers, presence
and resolution of every video file) is checked before the destination is created; what remains
(values, frame counts of videos) fails inside :func:`atomic_store`, which then leaves no destination.
Missing video files stop the import with one error listing them, unless ``skip_missing_video`` is set,
in which case the cameras with missing files are left out (and listed in the summary).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from vlaflow.data import lerobot_format as F
from vlaflow.data.store import KeySpec, atomic_store
from vlaflow.data.video import VideoError, VideoReader, probe_video
from vlaflow.errors import IngestError, VlaflowError

FORMAT = "lerobot"
SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
_MAX_LISTED = 20  # missing files named in one error message
_BATCH_BYTES = 128 * 1024 * 1024  # episodes buffered before one store append


def detect(src: Path) -> bool:
    return Path(src).is_dir() and (Path(src) / F.INFO_PATH).is_file()


@dataclass(frozen=True)
class _Feature:
    """One LeRobot feature imported as a store key."""

    name: str  # LeRobot feature name, e.g. "observation.images.front"
    key: str  # store key, e.g. "obs.image.front"
    kind: str  # "data" (parquet column) | "video" (mp4) | "image" (encoded bytes in parquet)
    dtype: str  # numpy dtype of the store key
    shape: tuple[int, ...]  # per-step shape in the store (images HWC)
    names: list[str] | None  # per-dimension names from info.json


@dataclass
class _Episode:
    index: int  # episode_index
    length: int  # frames, from the episode table
    tasks: list[str]  # task texts from the episode table (may be empty: then from task_index)
    data_file: Path  # parquet holding its rows
    from_index: int | None = None  # v3.0: global row range [from, to)
    to_index: int | None = None
    videos: dict[str, tuple[Path, float, float | None]] = field(
        default_factory=dict
    )  # name -> file, from, to


@dataclass
class _Layout:
    root: Path
    info: dict
    version: str
    fps: float
    features: list[_Feature]
    skipped: dict[str, str]  # feature name -> why it is not imported
    tasks: dict[int, str]
    episodes: list[_Episode]


# ---------------------------------------------------------------------------------------------- metadata
def _load_info(root: Path) -> tuple[dict, str, float]:
    info_path = root / F.INFO_PATH
    info = F.read_json(info_path)
    if not isinstance(info, dict):
        raise IngestError(f"{info_path}: expected a JSON object, found {type(info).__name__}")
    version = str(info.get("codebase_version", ""))
    if version not in SUPPORTED_VERSIONS:
        raise IngestError(
            f"{info_path}: codebase_version {version!r} is not supported "
            f"(expected one of {SUPPORTED_VERSIONS})"
        )
    fps = info.get("fps")
    if not isinstance(fps, int | float) or fps <= 0:
        raise IngestError(f"{info_path}: key 'fps': expected a positive number, found {fps!r}")
    if not isinstance(info.get("features"), dict) or not info["features"]:
        raise IngestError(f"{info_path}: key 'features': expected a non-empty object")
    return info, version, float(fps)


def _classify_features(info: dict, info_path: Path) -> tuple[list[_Feature], dict[str, str]]:
    features, skipped, seen = [], {}, {}
    for name, ft in info["features"].items():
        if name in F.BOOKKEEPING:
            continue
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise IngestError(
                f"{info_path}: feature {name!r}: expected an object with 'dtype' and 'shape', found {ft}"
            )
        dtype = ft["dtype"]
        key = F.to_store_key(name)
        if dtype in ("video", "image"):
            h, w, c = F.image_hwc(name, ft)
            if c not in (1, 3):
                raise IngestError(f"{info_path}: feature {name!r}: expected 1 or 3 channels, found {c}")
            feat = _Feature(name, key, dtype, "uint8", (h, w, 3), None)
        else:
            try:
                np_dtype = np.dtype(dtype)
            except TypeError:
                skipped[name] = f"dtype {dtype!r} is not numeric"
                continue
            if np_dtype.kind not in "biuf":
                skipped[name] = f"dtype {dtype!r} is not numeric"
                continue
            shape = tuple(int(s) for s in ft["shape"])
            names = ft.get("names")
            if isinstance(names, dict):  # v2.0 style {"motors": [...]}
                names = next(iter(names.values()), None)
            names = [str(n) for n in names] if isinstance(names, list) and len(shape) == 1 else None
            feat = _Feature(name, key, "data", np_dtype.name, shape, names)
        if key in seen:
            raise IngestError(
                f"{info_path}: features {seen[key]!r} and {name!r} both map to store key {key!r}"
            )
        seen[key] = name
        features.append(feat)
    return features, skipped


def _chunk_of(info: dict, episode: int) -> int:
    return episode // int(info.get("chunks_size") or F.DEFAULT_CHUNKS_SIZE)


def _episodes_v21(root: Path, info: dict, video_names: list[str]) -> tuple[list[_Episode], dict[int, str]]:
    rows = F.read_jsonl(root / F.LEGACY_EPISODES)
    tasks = {}
    for r in F.read_jsonl(root / F.LEGACY_TASKS):
        if "task_index" not in r or "task" not in r:
            raise IngestError(
                f"{root / F.LEGACY_TASKS}: expected task_index and task in every line, found {r}"
            )
        tasks[int(r["task_index"])] = str(r["task"])
    data_path = info.get("data_path") or F.V21_DATA_PATH
    video_path = info.get("video_path") or F.V21_VIDEO_PATH
    episodes = []
    for r in rows:
        if "episode_index" not in r or "length" not in r:
            raise IngestError(f"{root / F.LEGACY_EPISODES}: expected episode_index and length, found {r}")
        e = int(r["episode_index"])
        chunk = _chunk_of(info, e)
        ep = _Episode(
            e,
            int(r["length"]),
            [str(t) for t in r.get("tasks", [])],
            root / data_path.format(episode_chunk=chunk, episode_index=e),
        )
        for name in video_names:
            path = root / video_path.format(episode_chunk=chunk, video_key=name, episode_index=e)
            ep.videos[name] = (path, 0.0, None)
        episodes.append(ep)
    return episodes, tasks


def _episodes_v3(root: Path, info: dict, video_names: list[str]) -> tuple[list[_Episode], dict[int, str]]:
    tasks = F.read_tasks_parquet(root / F.TASKS_PARQUET)
    files = sorted((root / F.EPISODES_DIR).glob("*/*.parquet"))
    if not files:
        raise IngestError(f"{root / F.EPISODES_DIR}: no episode tables (expected chunk-XXX/file-XXX.parquet)")
    data_path = info.get("data_path") or F.V3_DATA_PATH
    video_path = info.get("video_path") or F.V3_VIDEO_PATH
    base = [
        "episode_index",
        "length",
        "data/chunk_index",
        "data/file_index",
        "dataset_from_index",
        "dataset_to_index",
    ]
    vcols = [
        f"videos/{n}/{c}"
        for n in video_names
        for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
    ]
    episodes = []
    for path in files:
        schema = F.parquet_schema(path)
        cols = base + (["tasks"] if "tasks" in schema.names else []) + vcols
        t = F.read_parquet(path, cols).to_pydict()
        ep_tasks = t.get("tasks") or [[] for _ in t["episode_index"]]
        for i in range(len(t["episode_index"])):
            dfile = root / data_path.format(
                chunk_index=t["data/chunk_index"][i], file_index=t["data/file_index"][i]
            )
            ep = _Episode(
                index=int(t["episode_index"][i]),
                length=int(t["length"][i]),
                tasks=[str(x) for x in ep_tasks[i] or []],
                data_file=dfile,
                from_index=int(t["dataset_from_index"][i]),
                to_index=int(t["dataset_to_index"][i]),
            )
            if ep.to_index - ep.from_index != ep.length:
                raise IngestError(
                    f"{path}: episode {ep.index}: length {ep.length} disagrees with dataset_from_index "
                    f"{ep.from_index} .. dataset_to_index {ep.to_index} "
                    f"({ep.to_index - ep.from_index} frames)"
                )
            for n in video_names:
                vfile = root / video_path.format(
                    video_key=n,
                    chunk_index=t[f"videos/{n}/chunk_index"][i],
                    file_index=t[f"videos/{n}/file_index"][i],
                )
                ep.videos[n] = (
                    vfile,
                    float(t[f"videos/{n}/from_timestamp"][i]),
                    float(t[f"videos/{n}/to_timestamp"][i]),
                )
            episodes.append(ep)
    return episodes, tasks


def _load_layout(root: Path) -> _Layout:
    info, version, fps = _load_info(root)
    features, skipped = _classify_features(info, root / F.INFO_PATH)
    video_names = [f.name for f in features if f.kind == "video"]
    if video_names and not info.get("video_path"):
        raise IngestError(f"{root / F.INFO_PATH}: video features {video_names} but no 'video_path' template")
    loader = _episodes_v3 if version == "v3.0" else _episodes_v21
    episodes, tasks = loader(root, info, video_names)
    episodes.sort(key=lambda e: e.index)
    idx = [e.index for e in episodes]
    if len(set(idx)) != len(idx):
        raise IngestError(f"{root}: episode table lists some episode_index more than once")
    n_frames = sum(e.length for e in episodes)
    for key, found in (("total_episodes", len(episodes)), ("total_frames", n_frames)):
        if key in info and int(info[key]) != found:
            raise IngestError(
                f"{root / F.INFO_PATH}: key {key!r} says {info[key]}, the episode tables hold {found}"
            )
    if not episodes:
        raise IngestError(f"{root}: the dataset has no episodes")
    return _Layout(root, info, version, fps, features, skipped, tasks, episodes)


def _check_videos(layout: _Layout, skip_missing: bool) -> list[str]:
    """Stop on missing video files (or drop those cameras); check sizes. Returns the dropped features."""
    missing: dict[str, list[Path]] = OrderedDict()
    for f in layout.features:
        if f.kind != "video":
            continue
        files = OrderedDict.fromkeys(ep.videos[f.name][0] for ep in layout.episodes)
        lost = [p for p in files if not p.is_file()]
        if lost:
            missing[f.name] = lost
    if missing and not skip_missing:
        lines, n = [], 0
        for name, paths in missing.items():
            for p in paths:
                if n < _MAX_LISTED:
                    lines.append(f"  {p}  (camera {name!r} -> {F.to_store_key(name)})")
                n += 1
        more = f"\n  ... and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
        raise IngestError(
            f"{layout.root}: {n} video file(s) declared in meta/info.json are missing, for camera(s) "
            f"{list(missing)}:\n"
            + "\n".join(lines)
            + more
            + "\nRe-download the videos, or pass --skip-missing-video (skip_missing_video=True) to import "
            "everything else without these cameras."
        )
    if missing:
        layout.features = [f for f in layout.features if f.name not in missing]
        for name, paths in missing.items():
            layout.skipped[name] = f"{len(paths)} video file(s) missing (skip_missing_video)"
    for f in layout.features:
        if f.kind != "video":
            continue
        frames_needed: dict[Path, int] = OrderedDict()
        for ep in layout.episodes:
            path = ep.videos[f.name][0]
            frames_needed[path] = frames_needed.get(path, 0) + ep.length
        for path, needed in frames_needed.items():
            try:
                p = probe_video(path)
            except VideoError as e:
                raise IngestError(f"feature {f.name!r}: {e}") from e
            if (p.height, p.width) != f.shape[:2]:
                raise IngestError(
                    f"{path}: feature {f.name!r}: info.json says {f.shape[0]}x{f.shape[1]} (h x w), "
                    f"the video is {p.height}x{p.width}"
                )
            # The container's frame count (0 when it does not say) is checked here, before anything is
            # written; decoding checks every episode's range again.
            exact = layout.version != "v3.0"  # v2.x: one file per episode; v3.0 files may hold more frames
            if p.n_frames and (p.n_frames < needed or (exact and p.n_frames != needed)):
                raise IngestError(
                    f"{path}: feature {f.name!r}: the episode table needs {needed} frames from this video, "
                    f"its header says it has {p.n_frames}"
                )
    return list(missing)


def _check_data_files(layout: _Layout) -> None:
    needed = [f.name for f in layout.features if f.kind in ("data", "image")]
    for path in OrderedDict.fromkeys(ep.data_file for ep in layout.episodes):
        schema = F.parquet_schema(path)
        lost = [c for c in needed if c not in schema.names]
        if lost:
            raise IngestError(
                f"{path}: columns {lost} declared in meta/info.json are missing; found {schema.names}"
            )
        for f in layout.features:
            if f.kind != "data":
                continue
            dims, t = [], schema.field(f.name).type
            while pa.types.is_fixed_size_list(t):  # variable-length lists are checked when read
                dims.append(t.list_size)
                t = t.value_type
            if dims and tuple(dims) != f.shape:
                raise IngestError(
                    f"{path}: column {f.name!r}: info.json says shape {list(f.shape)}, found {dims}"
                )


# ---------------------------------------------------------------------------------------------- per episode
class _DataFiles:
    """Reads each data parquet once (the current one is kept: episodes come in file order)."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.path: Path | None = None
        self.table: pa.Table | None = None
        self.episode_index: np.ndarray | None = None

    def rows(self, ep: _Episode) -> pa.Table:
        if ep.data_file != self.path:
            schema = F.parquet_schema(ep.data_file)
            cols = [c for c in self.columns if c in schema.names]
            self.table = F.read_parquet(ep.data_file, cols)
            self.path = ep.data_file
            self.episode_index = (
                self.table.column("episode_index").to_numpy()
                if "episode_index" in self.table.schema.names
                else None
            )
        table, where = self.table, ep.data_file
        if self.episode_index is None:
            sub = table
        else:
            pos = np.flatnonzero(self.episode_index == ep.index)
            if pos.size and pos[-1] - pos[0] + 1 != pos.size:
                raise IngestError(
                    f"{where}: episode {ep.index}: its rows are not contiguous (episode_index column)"
                )
            sub = table.slice(int(pos[0]), int(pos.size)) if pos.size else table.slice(0, 0)
        if sub.num_rows != ep.length:
            raise IngestError(
                f"{where}: episode {ep.index}: the episode table says {ep.length} frames, "
                f"the data file holds {sub.num_rows} rows"
            )
        return sub


def _check_bookkeeping(sub: pa.Table, ep: _Episode, layout: _Layout) -> list[int]:
    """Checks frame_index, timestamps, index and task_index; returns the episode's task indices."""
    where, names = ep.data_file, sub.schema.names
    n = sub.num_rows
    if "frame_index" in names:
        fi = sub.column("frame_index").to_numpy()
        bad = np.flatnonzero(fi != np.arange(n))
        if bad.size:
            r = int(bad[0])
            raise IngestError(
                f"{where}: episode {ep.index}: column 'frame_index': expected {r} at row {r}, found {fi[r]}"
            )
    if "timestamp" in names:
        ts = F.column_to_numpy(sub.column("timestamp"), (1,), "float64", where=str(where), name="timestamp")[
            :, 0
        ]
        if not np.isfinite(ts).all():
            r = int(np.flatnonzero(~np.isfinite(ts))[0])
            raise IngestError(
                f"{where}: episode {ep.index}: column 'timestamp': non-finite value {ts[r]} at frame {r}"
            )
        bad = np.flatnonzero(np.diff(ts) <= 0)
        if bad.size:
            r = int(bad[0])
            raise IngestError(
                f"{where}: episode {ep.index}: column 'timestamp' is not increasing: "
                f"expected a value > {ts[r]:.6f} "
                f"at frame {r + 1}, found {ts[r + 1]:.6f}"
            )
    if "index" in names and ep.from_index is not None:
        first = int(sub.column("index")[0].as_py())
        if first != ep.from_index:
            raise IngestError(
                f"{where}: episode {ep.index}: column 'index' starts at {first}, "
                f"the episode table says dataset_from_index {ep.from_index}"
            )
    task_ids: list[int] = []
    if "task_index" in names:
        ti = sub.column("task_index").to_numpy()
        task_ids = [int(t) for t in dict.fromkeys(ti.tolist())]
        unknown = [t for t in task_ids if t not in layout.tasks]
        if unknown:
            raise IngestError(
                f"{where}: episode {ep.index}: column 'task_index' has {unknown}, "
                f"not in the task table (known: {sorted(layout.tasks)})"
            )
    return task_ids


def _decode_images(col: pa.ChunkedArray, f: _Feature, ep: _Episode, root: Path) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(col), *f.shape), np.uint8)
    for i, item in enumerate(col.to_pylist()):
        if isinstance(item, dict) and item.get("bytes"):
            src = io.BytesIO(item["bytes"])
        elif isinstance(item, dict) and item.get("path"):
            src = root / item["path"]
        else:
            raise IngestError(
                f"{ep.data_file}: episode {ep.index}: column {f.name!r} row {i}: no image bytes or path"
            )
        try:
            img = np.asarray(Image.open(src).convert("RGB"))
        except Exception as e:
            raise IngestError(
                f"{ep.data_file}: episode {ep.index}: column {f.name!r} row {i}: bad image ({e})"
            ) from e
        if img.shape != f.shape:
            raise IngestError(
                f"{ep.data_file}: episode {ep.index}: column {f.name!r}: info.json says {list(f.shape)}, "
                f"found an image of {list(img.shape)}"
            )
        out[i] = img
    return out


def _read_episode(
    ep: _Episode, layout: _Layout, data: _DataFiles, readers: dict[Path, VideoReader]
) -> tuple[dict, str]:
    sub = data.rows(ep)
    task_ids = _check_bookkeeping(sub, ep, layout)
    # Keep open only the videos this episode reads (v2.1 has one file per episode: thousands otherwise).
    wanted = {ep.videos[f.name][0] for f in layout.features if f.kind == "video"}
    for path in [p for p in readers if p not in wanted]:
        readers.pop(path).close()
    arrays: dict[str, np.ndarray] = {}
    where = str(ep.data_file)
    for f in layout.features:
        if f.kind == "data":
            x = F.column_to_numpy(sub.column(f.name), f.shape, f.dtype, where=where, name=f.name)
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                r, c = np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0]
                raise IngestError(
                    f"{where}: episode {ep.index}: column {f.name!r}: expected finite values, found "
                    f"{x.reshape(len(x), -1)[r, c]} at frame {r}, element {c}"
                )
            arrays[f.key] = x
        elif f.kind == "image":
            arrays[f.key] = _decode_images(sub.column(f.name), f, ep, layout.root)
        else:
            path, t0, t1 = ep.videos[f.name]
            if path not in readers:
                readers[path] = VideoReader(path, fps=layout.fps)
            try:
                frames = readers[path].read_range(t0, t1, expected=ep.length)
            except VlaflowError as e:
                raise IngestError(f"feature {f.name!r}, episode {ep.index}: {e}") from e
            if frames.shape[1:] != f.shape:
                raise IngestError(
                    f"{path}: feature {f.name!r}: info.json says {list(f.shape)}, "
                    f"decoded {list(frames.shape[1:])}"
                )
            arrays[f.key] = frames
    texts = ep.tasks or [layout.tasks[t] for t in task_ids]
    return arrays, "; ".join(dict.fromkeys(texts))


class _Batch:
    """Episodes appended to the store in batches of about ``_BATCH_BYTES``: one zarr write per key per batch
    instead of per episode (per-episode appends rewrite partly filled chunks and were 2/3 of the time)."""

    def __init__(self, store, source: str):
        self.store, self.source = store, source
        self.arrays: list[dict[str, np.ndarray]] = []
        self.tasks: list[str] = []
        self.nbytes = 0

    def add(self, arrays: dict[str, np.ndarray], task: str) -> None:
        self.arrays.append(arrays)
        self.tasks.append(task)
        self.nbytes += sum(a.nbytes for a in arrays.values())
        if self.nbytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.arrays:
            return
        lengths = [len(next(iter(a.values()))) for a in self.arrays]
        data = {k: np.concatenate([a[k] for a in self.arrays]) for k in self.arrays[0]}
        n = len(self.arrays)
        self.store.append_episodes(data, lengths, self.tasks, [self.source] * n, [None] * n)
        self.arrays, self.tasks, self.nbytes = [], [], 0


# ---------------------------------------------------------------------------------------------- entry point
def ingest(
    src: str | Path,
    dest: str | Path,
    *,
    skip_missing_video: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Import a LeRobot v2.x / v3.0 dataset directory into a new episode store at ``dest``."""
    root = Path(src)
    layout = _load_layout(root)
    dropped = _check_videos(layout, skip_missing_video)
    _check_data_files(layout)
    if not layout.features:
        raise IngestError(f"{root}: nothing to import (features skipped: {layout.skipped})")
    keys = {f.key: KeySpec(f.dtype, f.shape, names=f.names) for f in layout.features}
    info = layout.info
    attrs = {
        "lerobot": {
            "codebase_version": layout.version,
            "robot_type": info.get("robot_type"),
            "source": str(root.resolve()),
            "features": {f.key: f.name for f in layout.features},
            "skipped_features": layout.skipped,
        }
    }
    columns = [f.name for f in layout.features if f.kind in ("data", "image")] + list(F.BOOKKEEPING)
    data = _DataFiles(columns)
    readers: dict[Path, VideoReader] = {}
    source = f"lerobot:{root.resolve().name}"
    tasks: list[str] = []
    try:
        with atomic_store(dest, keys=keys, fps=layout.fps, attrs=attrs, overwrite=overwrite) as store:
            batch = _Batch(store, source)
            for ep in tqdm(layout.episodes, desc=f"lerobot {root.name}", unit="ep", disable=not progress):
                arrays, task = _read_episode(ep, layout, data, readers)
                batch.add(arrays, task)
                tasks.append(task)
            batch.flush()
            n_episodes, n_steps = store.n_episodes, store.n_steps
    finally:
        for r in readers.values():
            r.close()
    return {
        "format": FORMAT,
        "codebase_version": layout.version,
        "n_episodes": n_episodes,
        "n_steps": n_steps,
        "fps": layout.fps,
        "keys": {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in keys.items()},
        "tasks": list(dict.fromkeys(tasks)),
        "skipped_cameras": dropped,
        "skipped_features": layout.skipped,
    }
