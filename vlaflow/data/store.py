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
renames). After ``episode_ends`` the append records the committed episode count (``n_committed`` in the
attributes of ``meta/episode_ends``). A writer killed at any point leaves a store whose ``episode_ends``
names only complete episodes; anything past its last entry is an unfinished tail that readers ignore,
``validate`` reports and ``repair`` trims. A kill between ``episode_ends``' resize and its chunk write
leaves fill values at its end (or a chunk never written): that is the only invalid ``episode_ends`` a
crash can make, and the only one treated as unfinished. Anything else -- a bad entry followed by valid
ones, a missing chunk where committed episodes were -- is damage: opening the store raises a StoreError
naming it, and ``repair`` refuses (:mod:`vlaflow.data.integrity` has the rule).

Every chunk is stored, even one equal to the fill value (schema flag ``dense_chunks``), so a chunk object
missing from the listing is damage and not zeros: :meth:`EpisodeStore.missing_chunks` and
:meth:`EpisodeStore.require_intact` check that cheaply; :func:`vlaflow.data.validate.validate_store`
decodes every chunk.

One writer at a time: every writable handle holds the store's writer lock (:mod:`vlaflow.data.lock`)
until :meth:`EpisodeStore.close` (or the end of its ``with`` block, or interpreter exit).

diffusion_policy's v2 stores (``data/<key>`` + ``meta/episode_ends``, no schema) open read-only with
keys exactly as stored and a schema inferred from the arrays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec

import vlaflow.keys as K
from vlaflow.atomic import aside_hint, atomic_directory, pause_point, restore_aside
from vlaflow.data.integrity import (
    EndsCheck,
    Finding,
    block_rows,
    check_episode_ends,
    chunk_file,
    chunk_len,
    missing_blocks,
    read_or_locate,
)
from vlaflow.data.lock import LOCK_NAME, LockHandle, acquire
from vlaflow.data.store_checks import META_ARRAYS, StoreChecks, dense, is_remote, local_path
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


_is_remote, _local_path = is_remote, local_path


def _storage_options(path: str | os.PathLike) -> dict | None:
    # fsspec's local filesystem does not create parent directories unless asked
    return {"auto_mkdir": True} if str(path).startswith("file://") else None


@dataclass
class EpisodeStore(StoreChecks):
    """An open episode store. Use :meth:`create`, :meth:`open` or :func:`atomic_store`.

    A writable handle holds the store's writer lock: ``close()`` it, or use it as a context manager.
    """

    root: zarr.Group
    path: str
    writable: bool = False
    legacy: bool = False  # a diffusion_policy v2 store (no vlaflow schema)
    _keys: dict[str, KeySpec] = field(default_factory=dict)
    _fps: float | None = None
    _dense_chunks: bool = False  # every chunk is stored (stores written since the flag existed)
    _lock: LockHandle | None = None
    _closed: bool = False

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
        lock = None
        if _is_remote(path):
            root = zarr.open_group(
                str(path),
                mode="w" if overwrite else "w-",
                zarr_format=3,
                storage_options=_storage_options(path),
            )
        else:
            local = _local_path(path)
            try:
                local.mkdir(parents=True, exist_ok=overwrite)
            except FileExistsError as e:
                raise StoreError(f"{path}: destination exists (pass overwrite=True / --overwrite)") from e
            lock = acquire(local)  # before anything is removed: refuses a store another process writes
            try:
                for child in local.iterdir():  # what overwrite replaces, except our own lock file
                    if child.name != LOCK_NAME:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                root = zarr.open_group(str(local), mode="a", zarr_format=3)
            except BaseException:
                lock.release()
                raise
        schema = {
            "format": K.FORMAT_NAME,
            "version": K.FORMAT_VERSION,
            "fps": float(fps),
            "keys": {k: s.to_dict() for k, s in specs.items()},
            "dense_chunks": True,
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
            meta.create_array(
                name,
                shape=(0,),
                chunks=(1 << 16,),
                dtype=dtype,
                fill_value=fill,
                attributes={"n_committed": 0} if name == "episode_ends" else None,
            )
        store = cls(root=root, path=str(path), writable=True, _lock=lock)
        store._load_schema()
        store._finalize_on_collect()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, check: bool = True) -> EpisodeStore:
        """Open a store (local path or fsspec URL). ``mode`` is "r" or "a" (append, takes the writer lock).

        A damaged store (see the module doc) raises a StoreError naming what is wrong; ``check=False``
        opens it anyway, for :meth:`problems`, :meth:`repair` and ``validate_store`` to look at.
        """
        if mode not in ("r", "a"):
            raise StoreError(f"open mode must be 'r' or 'a', got {mode!r}")
        if not _is_remote(path) and not _local_path(path).exists():
            raise StoreError(f"{path}: no such episode store{aside_hint(path)}")
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
        if mode == "a" and not _is_remote(path):
            store._lock = acquire(_local_path(path))
            store._finalize_on_collect()
        if check:
            try:
                store._raise_if_damaged()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        """Release the writer lock (if held); the handle stays readable. Closing twice is harmless."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.writable:
            self._closed = True
        self.writable = False

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _finalize_on_collect(self) -> None:
        if self._lock is not None:  # released when the handle is collected or at interpreter exit
            weakref.finalize(self, self._lock.release)

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
        self._dense_chunks = bool(schema.get("dense_chunks", False))
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

    def _data_arrays(self) -> dict[str, zarr.Array]:
        """Every schema key's array, opened once (each lookup reads its metadata from the store)."""
        data = self.root[K.DATA_GROUP]
        return {k: data[k] for k in self._keys}

    def _ends_state(
        self, data: Mapping[str, zarr.Array] | None = None
    ) -> tuple[np.ndarray, EndsCheck, Finding | None]:
        """(meta/episode_ends as read, the verdict on it, a finding for an undecodable chunk of it)."""
        data = self._data_arrays() if data is None else data
        arr = self.root[K.EPISODE_ENDS]
        raw, bad, err = read_or_locate(arr, slice(None))
        if raw is None:
            c = bad[0] if bad else 0
            f = Finding(
                "corrupt_chunk",
                f"{K.EPISODE_ENDS} chunk {c} ({chunk_file(self.path, arr, bad or (0,))}) cannot be decoded "
                f"({err}): the finished episodes cannot be known",
                True,
                key=K.EPISODE_ENDS,
                chunk=c,
                file=chunk_file(self.path, arr, bad or (0,)),
                rows=block_rows(arr, c),
            )
            return np.zeros(0, np.int64), EndsCheck(0, 0, f.message), f
        raw = raw.astype(np.int64)
        fill = int(arr.fill_value)
        # a listing is needed only when fill values end the array (a chunk may be absent there)
        missing = [b[0] for b in missing_blocks(arr)] if raw.size and raw[-1] == fill else []
        n_committed = None if self.legacy else arr.attrs.get("n_committed")
        n_data = min(a.shape[0] for a in data.values())
        verdict = check_episode_ends(raw, fill, n_data, chunk_len(arr), missing, n_committed)
        return raw, verdict, None

    def _raise_if_damaged(self) -> None:
        damage = [f for f in self._structure() if f.damage]
        if damage:
            more = f" (and {len(damage) - 1} more problem(s))" if len(damage) > 1 else ""
            raise StoreError(
                f"{self.path}: the store is damaged: {damage[0].message}{more}. Readers will not use a "
                f"prefix of it; run `vlaflow validate {self.path}` for a full report"
            )

    @property
    def episode_ends(self) -> np.ndarray:
        """Cumulative ends of the finished episodes; a StoreError if ``meta/episode_ends`` is damaged."""
        raw, verdict, _ = self._ends_state()
        if verdict.damage:
            raise StoreError(
                f"{self.path}: the store is damaged: {verdict.damage}. Run `vlaflow validate {self.path}`"
            )
        return raw[: verdict.n_finished]

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

    def _read(self, key: str, sl: slice) -> np.ndarray:
        arr = self.array(key)
        out, bad, err = read_or_locate(arr, sl)
        if out is None:
            where_ = f"chunk {bad[0]} ({chunk_file(self.path, arr, bad)})" if bad else "a chunk"
            raise StoreError(
                f"{self.path}: data/{key} {where_} cannot be decoded ({err}); "
                f"run `vlaflow validate {self.path}`"
            )
        return out

    def read(self, key: str) -> np.ndarray:
        """All finished steps of ``key`` as one numpy array."""
        return self._read(key, slice(0, self.n_steps))

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {k: self._read(k, sl) for k in (keys or list(self._keys))}

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
        t, s, ok = (int(meta[name][i]) for name in META_ARRAYS)
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

    def _require_writable(self, doing: str = "append") -> None:
        if self._closed:
            raise StoreError(
                f"{self.path}: this store handle is closed; open it again with mode='a' to {doing}"
            )
        if not self.writable:
            raise StoreError(f"{self.path}: store is open read-only (open with mode='a' to {doing})")

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
        self._require_writable()
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

        data_arrays = self._data_arrays()
        raw, verdict, _ = self._ends_state(data_arrays)
        if verdict.damage:  # never append to a damaged store
            raise StoreError(f"{self.path}: the store is damaged: {verdict.damage}; nothing was appended")
        ends_arr = dense(self.root[K.EPISODE_ENDS])
        n_ep = verdict.n_finished
        start = int(raw[n_ep - 1]) if n_ep else 0
        # 1. data (anything past `start` is an unfinished tail from a crash: overwrite it)
        for k, a in arrays.items():
            arr = dense(data_arrays[k])
            arr.resize((start + total, *arr.shape[1:]))
            arr[start : start + total] = a
        # 2. per-episode metadata
        meta = self.root[K.META_GROUP]
        task_idx = [self._intern(meta, "tasks", t) for t in tasks]
        source_idx = [self._intern(meta, "sources", s) for s in sources]
        ok = [-1 if s is None else int(bool(s)) for s in successes]
        for name, values in zip(META_ARRAYS, (task_idx, source_idx, ok), strict=True):
            m = dense(meta[name])
            m.resize((n_ep + n_new,))
            m[n_ep:] = np.asarray(values, dtype=m.dtype)
        pause_point("append")  # crash tests: a kill here leaves exactly an unfinished tail
        # 3. episode_ends last: this is what makes the episodes visible
        ends_arr.resize((n_ep + n_new,))
        ends_arr[n_ep:] = start + np.cumsum(lengths)
        # 4. the committed count: fill values or a missing chunk before it are damage, not a killed append
        if not self.legacy:
            ends_arr.attrs["n_committed"] = n_ep + n_new
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
        self._require_writable("save statistics")
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
    An existing ``dest`` that another process is writing (it holds the writer lock) is not replaced; ours
    holds it until the swap. After the block the handle is read-only. Remote URLs cannot be renamed
    atomically, so they are written in place and deleted on failure (and are not locked).
    """
    if _is_remote(dest):
        store = EpisodeStore.create(dest, keys, fps, attrs, overwrite=overwrite)
        try:
            yield store
        except BaseException:
            with contextlib.suppress(Exception):
                fs, p = fsspec.core.url_to_fs(str(dest))
                fs.rm(p, recursive=True)
            raise
        return
    final = _local_path(dest).absolute()
    restore_aside(final)  # a store a killed replacement left aside is the existing destination again
    if final.exists() and not overwrite:
        raise StoreError(f"{dest}: destination exists (pass --overwrite to replace it)")
    dest_lock = acquire(final, "destination store") if final.is_dir() else None
    try:
        # the old store is replaced only once the new one is complete, and never deleted before that
        with atomic_directory(final, overwrite=overwrite, what="destination store") as tmp:
            store = EpisodeStore.create(tmp, keys, fps, attrs, overwrite=True)
            try:
                yield store
            finally:
                store.close()  # the lock file leaves the new store before it is moved into place
    finally:
        if dest_lock is not None:
            dest_lock.release()  # its file went with the old store, or is removed here on failure
    store.path = str(final)
    store.root = zarr.open_group(str(final), mode="r")
