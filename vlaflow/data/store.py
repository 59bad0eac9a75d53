"""The episode store: one zarr group per dataset (DESIGN.md section 1).

Layout::

    <root>/zarr.json                 attrs: {"vlaflow": {format, version, fps, keys}, ...user attrs}
    <root>/data/<key>                arrays concatenated along time, shape (N, *per_step_shape)
    <root>/meta/episode_ends         int64, cumulative end index of every finished episode
    <root>/meta/episode_task_index   int32 per episode, into meta attrs "tasks" (instruction texts)
    <root>/meta/episode_source_index int32 per episode, into meta attrs "sources"
    <root>/meta/episode_success      int8 per episode: 1 success, 0 failure, -1 unknown

Why this order of writes: an episode is appended data first, per-episode metadata next and
``episode_ends`` last, and every zarr file write is atomic (LocalStore writes to a temporary file and
renames). A writer killed at any point leaves a store whose ``episode_ends`` names only complete
episodes; anything past its last entry is an unfinished tail that readers ignore, ``validate`` reports
and ``repair`` trims. ``episode_ends`` itself is read defensively (only its longest valid prefix counts),
because a kill between its resize and its chunk write leaves a fill value at the end.

diffusion_policy's v2 stores (``data/<key>`` + ``meta/episode_ends``, no schema) open read-only with
keys exactly as stored and a schema inferred from the arrays.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from vlaflow import keys as K
from vlaflow.atomic import atomic_directory
from vlaflow.errors import StoreError

_ATTR = "vlaflow"
_TARGET_CHUNK_BYTES = 2 * 1024 * 1024  # DESIGN: chunks of roughly 1-4 MB along time
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
_IMAGE_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


@dataclass(frozen=True)
class KeySpec:
    """Schema of one per-step key."""

    dtype: str  # numpy dtype name, e.g. "float32"; images are "uint8"
    shape: tuple[int, ...]  # per-step shape, e.g. (2,) or (96, 96, 3)
    role: str = ""  # action | state | image | observation | other ("" -> derived from the key name)
    names: list[str] | None = None  # optional per-dimension names/units

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        try:
            np.dtype(self.dtype)
        except TypeError as e:
            raise StoreError(f"KeySpec dtype {self.dtype!r} is not a numpy dtype") from e
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "role": self.role, "names": self.names}

    @staticmethod
    def from_dict(d: Mapping) -> KeySpec:
        return KeySpec(d["dtype"], tuple(d["shape"]), d.get("role", ""), d.get("names"))


def _chunk_rows(spec: KeySpec) -> int:
    row_bytes = max(1, int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize)
    return int(max(1, min(1 << 20, _TARGET_CHUNK_BYTES // row_bytes)))


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _storage_options(path: str | os.PathLike) -> dict | None:
    # fsspec's local filesystem does not create parent directories unless asked
    return {"auto_mkdir": True} if str(path).startswith("file://") else None


def _local_path(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://") :]) if s.startswith("file://") else Path(s)


@dataclass
class EpisodeStore:
    """An open episode store. Use :meth:`create`, :meth:`open` or :func:`atomic_store`."""

    root: zarr.Group
    path: str
    writable: bool = False
    legacy: bool = False  # a diffusion_policy v2 store (no vlaflow schema)
    _keys: dict[str, KeySpec] = field(default_factory=dict)
    _fps: float | None = None

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        keys: Mapping[str, KeySpec],
        fps: float,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> EpisodeStore:
        """Create an empty store at ``path`` (a directory or fsspec URL) with the given schema."""
        if not keys:
            raise StoreError(f"{path}: a store needs at least one key")
        if not fps or fps <= 0:
            raise StoreError(f"{path}: fps must be > 0, got {fps!r}")
        if not _is_remote(path) and _local_path(path).exists() and not overwrite:
            raise StoreError(f"{path}: destination exists (pass overwrite=True / --overwrite to replace it)")
        specs = {k: (v if isinstance(v, KeySpec) else KeySpec(**v)) for k, v in keys.items()}
        specs = {k: KeySpec(s.dtype, s.shape, s.role or K.default_role(k), s.names) for k, s in specs.items()}
        for k, s in specs.items():
            if K.is_image(k) and (s.dtype != "uint8" or len(s.shape) != 3 or s.shape[-1] not in (1, 3)):
                raise StoreError(
                    f"{path}: image key {k!r} must be uint8 (h, w, 3|1), got {s.dtype} {s.shape}"
                )
        root = zarr.open_group(
            str(path), mode="w" if overwrite else "w-", zarr_format=3, storage_options=_storage_options(path)
        )
        schema = {
            "format": K.FORMAT_NAME,
            "version": K.FORMAT_VERSION,
            "fps": float(fps),
            "keys": {k: s.to_dict() for k, s in specs.items()},
        }
        root.attrs.update({**dict(attrs or {}), _ATTR: schema})
        data = root.create_group(K.DATA_GROUP)
        for k, s in specs.items():
            rows = _chunk_rows(s)
            data.create_array(
                k,
                shape=(0, *s.shape),
                chunks=(rows, *s.shape),
                dtype=s.dtype,
                compressors=_IMAGE_COMPRESSOR if K.is_image(k) else _COMPRESSOR,
                fill_value=0,
            )
        meta = root.create_group(K.META_GROUP)
        meta.attrs.update({"tasks": [], "sources": []})
        for name, dtype, fill in (
            ("episode_ends", "int64", -1),
            ("episode_task_index", "int32", -1),
            ("episode_source_index", "int32", -1),
            ("episode_success", "int8", -1),
        ):
            meta.create_array(name, shape=(0,), chunks=(1 << 16,), dtype=dtype, fill_value=fill)
        store = cls(root=root, path=str(path), writable=True)
        store._load_schema()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> EpisodeStore:
        """Open a store (local path or fsspec URL). ``mode`` is "r" or "a" (append)."""
        if mode not in ("r", "a"):
            raise StoreError(f"open mode must be 'r' or 'a', got {mode!r}")
        if not _is_remote(path) and not _local_path(path).exists():
            raise StoreError(f"{path}: no such episode store")
        try:
            root = zarr.open_group(
                str(path), mode="r" if mode == "r" else "r+", storage_options=_storage_options(path)
            )
        except Exception as e:  # zarr raises several types for a non-store directory
            raise StoreError(f"{path}: not a zarr group ({type(e).__name__}: {e})") from e
        if K.DATA_GROUP not in root or "episode_ends" not in root.get(K.META_GROUP, {}):
            raise StoreError(f"{path}: not an episode store (expected data/ and meta/episode_ends)")
        store = cls(root=root, path=str(path), writable=mode == "a")
        store._load_schema()
        if store.legacy and mode == "a":
            raise StoreError(
                f"{path}: a diffusion_policy v2 store opens read-only; ingest it with `vlaflow ingest`"
            )
        return store

    def _load_schema(self) -> None:
        schema = self.root.attrs.get(_ATTR)
        if schema is None:
            self.legacy = True
            self._keys = {}
            for k, arr in self.root[K.DATA_GROUP].arrays():
                self._keys[k] = KeySpec(arr.dtype.name, tuple(arr.shape[1:]), K.default_role(k))
            self._fps = None
            return
        if schema.get("format") != K.FORMAT_NAME:
            raise StoreError(
                f"{self.path}: unknown format {schema.get('format')!r} (expected {K.FORMAT_NAME})"
            )
        if int(schema.get("version", 0)) > K.FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {schema['version']} is newer than this vlaflow "
                f"supports ({K.FORMAT_VERSION}); upgrade vlaflow"
            )
        self._keys = {k: KeySpec.from_dict(v) for k, v in schema["keys"].items()}
        self._fps = float(schema["fps"])
        missing = [k for k in self._keys if k not in self.root[K.DATA_GROUP]]
        if missing:
            raise StoreError(f"{self.path}: schema lists keys with no array under data/: {missing}")

    # ------------------------------------------------------------------ properties
    @property
    def keys(self) -> dict[str, KeySpec]:
        return dict(self._keys)

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def attrs(self) -> dict:
        return {k: v for k, v in self.root.attrs.asdict().items() if k != _ATTR}

    @property
    def episode_ends(self) -> np.ndarray:
        """Cumulative ends of the finished episodes (the longest valid prefix of meta/episode_ends)."""
        raw = np.asarray(self.root[K.EPISODE_ENDS][:], dtype=np.int64)
        n_data = min(self.root[K.DATA_GROUP][k].shape[0] for k in self._keys)
        valid = (raw > np.concatenate([[0], raw[:-1]])) & (raw <= n_data)
        # The first episode may legitimately be longer than 0 only; a zero-length episode is invalid.
        bad = np.flatnonzero(~valid)
        return raw[: bad[0]] if bad.size else raw

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if ends.size else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def episode_slice(self, i: int) -> slice:
        ends = self.episode_ends
        if not -len(ends) <= i < len(ends):
            raise StoreError(f"{self.path}: episode {i} out of range (store has {len(ends)} episodes)")
        i = i % len(ends)
        return slice(int(ends[i - 1]) if i > 0 else 0, int(ends[i]))

    def array(self, key: str) -> zarr.Array:
        self._check_key(key)
        return self.root[K.DATA_GROUP][key]

    def read(self, key: str) -> np.ndarray:
        """All finished steps of ``key`` as one numpy array."""
        return np.asarray(self.array(key)[: self.n_steps])

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {k: np.asarray(self.array(k)[sl]) for k in (keys or list(self._keys))}

    def _check_key(self, key: str) -> None:
        if key not in self._keys:
            raise StoreError(f"{self.path}: no key {key!r}; the store has {sorted(self._keys)}")

    # ------------------------------------------------------------------ per-episode metadata
    def _meta_strings(self, name: str) -> list[str]:
        return list(self.root[K.META_GROUP].attrs.get(name, []))

    @property
    def tasks(self) -> list[str]:
        return self._meta_strings("tasks")

    def episode_task_indices(self) -> np.ndarray:
        if self.legacy:
            return np.full(self.n_episodes, -1, dtype=np.int32)
        return np.asarray(self.root[K.EPISODE_TASK][: self.n_episodes])

    def episode_meta(self, i: int) -> dict:
        n = self.n_episodes
        if not 0 <= i < n:
            raise StoreError(f"{self.path}: episode {i} out of range (store has {n} episodes)")
        if self.legacy:
            return {"task": "", "source": "diffusion_policy", "success": None}
        meta = self.root[K.META_GROUP]
        t, s, ok = (
            int(meta["episode_task_index"][i]),
            int(meta["episode_source_index"][i]),
            int(meta["episode_success"][i]),
        )
        tasks, sources = self.tasks, self._meta_strings("sources")
        return {
            "task": tasks[t] if 0 <= t < len(tasks) else "",
            "source": sources[s] if 0 <= s < len(sources) else "",
            "success": None if ok < 0 else bool(ok),
        }

    # ------------------------------------------------------------------ writing
    def append_episode(
        self,
        data: Mapping[str, np.ndarray],
        task: str = "",
        source: str = "",
        success: bool | None = None,
    ) -> int:
        """Append one finished episode; returns its index. Visible to readers only once complete."""
        return self.append_episodes(data, [self._episode_length(data)], [task], [source], [success])

    def _episode_length(self, data: Mapping[str, np.ndarray]) -> int:
        lengths = {k: int(np.shape(v)[0]) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise StoreError(f"{self.path}: keys of one episode have different lengths: {lengths}")
        return next(iter(lengths.values()))

    def append_episodes(
        self,
        data: Mapping[str, np.ndarray],
        lengths: list[int] | np.ndarray,
        tasks: list[str] | None = None,
        sources: list[str] | None = None,
        successes: list[bool | None] | None = None,
    ) -> int:
        """Append several finished episodes whose steps are concatenated in ``data``; returns the first index.

        Bulk ingest uses this: one write per array instead of one per episode.
        """
        if not self.writable:
            raise StoreError(f"{self.path}: store is open read-only (open with mode='a' to append)")
        lengths = np.asarray(lengths, dtype=np.int64)
        n_new = len(lengths)
        if n_new == 0:
            return self.n_episodes
        if (lengths <= 0).any():
            raise StoreError(
                f"{self.path}: episodes must have at least one step, got lengths {lengths.tolist()}"
            )
        tasks = list(tasks) if tasks is not None else [""] * n_new
        sources = list(sources) if sources is not None else [""] * n_new
        successes = list(successes) if successes is not None else [None] * n_new
        if not len(tasks) == len(sources) == len(successes) == n_new:
            raise StoreError(f"{self.path}: need one task/source/success per episode ({n_new})")
        total = int(lengths.sum())
        missing, extra = sorted(set(self._keys) - set(data)), sorted(set(data) - set(self._keys))
        if missing or extra:
            raise StoreError(
                f"{self.path}: episode keys do not match the store schema: "
                f"missing {missing}, unexpected {extra}"
            )
        arrays = {}
        for k, spec in self._keys.items():
            a = np.asarray(data[k])
            if a.shape != (total, *spec.shape):
                raise StoreError(
                    f"{self.path}: key {k!r}: expected shape {(total, *spec.shape)} (steps, *{spec.shape}), "
                    f"got {a.shape}"
                )
            if np.dtype(spec.dtype) == np.uint8 and a.dtype != np.uint8:
                raise StoreError(
                    f"{self.path}: key {k!r} is uint8 in the schema, got {a.dtype} (convert first)"
                )
            arrays[k] = a.astype(spec.dtype, copy=False)

        ends_arr = self.root[K.EPISODE_ENDS]
        n_ep, start = self.n_episodes, self.n_steps
        # 1. data (anything past `start` is an unfinished tail from a crash: overwrite it)
        for k, a in arrays.items():
            arr = self.root[K.DATA_GROUP][k]
            arr.resize((start + total, *arr.shape[1:]))
            arr[start : start + total] = a
        # 2. per-episode metadata
        meta = self.root[K.META_GROUP]
        task_idx = [self._intern(meta, "tasks", t) for t in tasks]
        source_idx = [self._intern(meta, "sources", s) for s in sources]
        ok = [-1 if s is None else int(bool(s)) for s in successes]
        for name, values in (
            ("episode_task_index", task_idx),
            ("episode_source_index", source_idx),
            ("episode_success", ok),
        ):
            m = meta[name]
            m.resize((n_ep + n_new,))
            m[n_ep:] = np.asarray(values, dtype=m.dtype)
        # 3. episode_ends last: this is what makes the episodes visible
        ends_arr.resize((n_ep + n_new,))
        ends_arr[n_ep:] = start + np.cumsum(lengths)
        return n_ep

    @staticmethod
    def _intern(meta: zarr.Group, name: str, value: str) -> int:
        table = list(meta.attrs.get(name, []))
        if value not in table:
            table.append(value)
            meta.attrs[name] = table
        return table.index(value)

    # ------------------------------------------------------------------ statistics
    def save_stats(self, stats: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Save normalizer statistics (see :mod:`vlaflow.data.normalize`) with the store."""
        if not self.writable:
            raise StoreError(f"{self.path}: store is open read-only")
        payload = {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}
        self.root[K.META_GROUP].attrs["stats"] = {"n_steps": self.n_steps, "keys": payload}

    def load_stats(self) -> dict[str, dict[str, np.ndarray]] | None:
        """Saved statistics, or None if absent or stale (computed for a different number of steps)."""
        if self.legacy:
            return None
        saved = self.root[K.META_GROUP].attrs.get("stats")
        if not saved or saved.get("n_steps") != self.n_steps:
            return None
        return {
            k: {s: np.asarray(v, dtype=np.float32) for s, v in d.items()} for k, d in saved["keys"].items()
        }

    # ------------------------------------------------------------------ integrity
    def problems(self) -> list[str]:
        """Everything wrong with the store, as human-readable lines (empty when healthy)."""
        out = []
        raw = np.asarray(self.root[K.EPISODE_ENDS][:], dtype=np.int64)
        ends = self.episode_ends
        if raw.shape[0] != ends.shape[0]:
            out.append(
                f"meta/episode_ends has {raw.shape[0] - ends.shape[0]} invalid trailing entries "
                f"(unfinished episode append); `vlaflow repair` drops them"
            )
        n = self.n_steps
        for k in self._keys:
            arr = self.root[K.DATA_GROUP][k]
            if arr.shape[0] > n:
                out.append(
                    f"data/{k} has an unfinished tail of {arr.shape[0] - n} steps past the last episode"
                )
            if tuple(arr.shape[1:]) != self._keys[k].shape:
                out.append(f"data/{k} has per-step shape {arr.shape[1:]}, schema says {self._keys[k].shape}")
        if not self.legacy:
            for name in ("episode_task_index", "episode_source_index", "episode_success"):
                m = self.root[K.META_GROUP][name]
                if m.shape[0] < ends.shape[0]:
                    out.append(f"meta/{name} has {m.shape[0]} entries for {ends.shape[0]} episodes")
                elif m.shape[0] > ends.shape[0]:
                    out.append(
                        f"meta/{name} has {m.shape[0] - ends.shape[0]} entries for unfinished episodes"
                    )
        return out

    def repair(self) -> list[str]:
        """Trim everything past the last finished episode; returns what was done."""
        if not self.writable:
            raise StoreError(f"{self.path}: open with mode='a' to repair")
        done = []
        ends = self.episode_ends
        raw = self.root[K.EPISODE_ENDS]
        if raw.shape[0] != ends.shape[0]:
            done.append(f"dropped {raw.shape[0] - ends.shape[0]} invalid entries of meta/episode_ends")
            raw.resize((ends.shape[0],))
        n = self.n_steps
        for k in self._keys:
            arr = self.root[K.DATA_GROUP][k]
            if arr.shape[0] > n:
                done.append(f"trimmed data/{k} from {arr.shape[0]} to {n} steps")
                arr.resize((n, *arr.shape[1:]))
        for name in ("episode_task_index", "episode_source_index", "episode_success"):
            m = self.root[K.META_GROUP][name]
            if m.shape[0] > ends.shape[0]:
                done.append(f"trimmed meta/{name} to {ends.shape[0]} episodes")
                m.resize((ends.shape[0],))
        return done


@contextlib.contextmanager
def atomic_store(
    dest: str | os.PathLike,
    keys: Mapping[str, KeySpec],
    fps: float,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[EpisodeStore]:
    """Create a store in a temporary directory beside ``dest`` and move it into place only on success.

    A failed or interrupted ingest leaves no ``dest`` (and removes its temporary directory when it can).
    Remote URLs cannot be renamed atomically, so they are written in place and deleted on failure.
    """
    if _is_remote(dest):
        store = EpisodeStore.create(dest, keys, fps, attrs, overwrite=overwrite)
        try:
            yield store
        except BaseException:
            with contextlib.suppress(Exception):
                import fsspec

                fs, p = fsspec.core.url_to_fs(str(dest))
                fs.rm(p, recursive=True)
            raise
        return
    final = _local_path(dest).absolute()
    if final.exists() and not overwrite:
        raise StoreError(f"{dest}: destination exists (pass --overwrite to replace it)")
    # the old store is replaced only once the new one is complete, and never deleted before that
    with atomic_directory(final, overwrite=overwrite, what="destination store") as tmp:
        store = EpisodeStore.create(tmp, keys, fps, attrs, overwrite=True)
        yield store
    store.path = str(final)
    store.root = zarr.open_group(str(final), mode="r+")
