"""Checks and repair of an episode store: the cheap checks (:meth:`StoreChecks.missing_chunks`,
:meth:`StoreChecks.require_intact`), the problem list and the recoverable trim of an unfinished tail.

A mixin of :class:`vlaflow.data.store.EpisodeStore`, kept apart so that the store module reads as the
write protocol; the rules themselves are in :mod:`vlaflow.data.integrity`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

import vlaflow.keys as K
from vlaflow.data.integrity import (
    PARTIAL_SUFFIX,
    Finding,
    block_rows,
    chunk_file,
    episode_range,
    missing_blocks,
    save_backup,
    truncated_blocks,
    where,
)
from vlaflow.errors import StoreError

META_ARRAYS = ("episode_task_index", "episode_source_index", "episode_success")


def dense(arr: zarr.Array) -> zarr.Array:
    """``arr`` writing all-fill chunks too, so that a chunk missing from the listing is always damage."""
    return arr.with_config({"write_empty_chunks": True})


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://") :]) if s.startswith("file://") else Path(s)


class StoreChecks:
    """Integrity methods of EpisodeStore (which provides root, path, legacy, _keys, _dense_chunks,
    _ends_state, _read, _meta_strings, tasks and _require_writable)."""

    # ------------------------------------------------------------------ integrity
    def _meta_arrays(self) -> list[str]:
        return [] if self.legacy else list(META_ARRAYS)

    def _structure(self) -> list[Finding]:
        """What a glance at shapes and at meta/episode_ends shows (no listing of data chunks)."""
        data = self._data_arrays()
        raw, verdict, corrupt = self._ends_state(data)
        if corrupt is not None:
            return [corrupt]
        out = []
        k = verdict.n_finished
        if verdict.damage:
            out.append(Finding("episode_ends", verdict.damage, True, key=K.EPISODE_ENDS))
            ends = self.root[K.EPISODE_ENDS]
            for c in verdict.lost_chunks:
                file = chunk_file(self.path, ends, (c,))
                rows = block_rows(ends, c)
                out.append(
                    Finding(
                        "missing_chunk",
                        f"{K.EPISODE_ENDS} chunk {c} (entries {rows[0]}..{rows[1] - 1}) is missing: {file}",
                        True,
                        key=K.EPISODE_ENDS,
                        chunk=c,
                        file=file,
                        rows=rows,
                    )
                )
        elif verdict.n_tail:
            out.append(
                Finding(
                    "tail",
                    f"meta/episode_ends has {verdict.n_tail} invalid trailing entries (unfinished episode "
                    "append: fill values after the last committed episode); `vlaflow repair` drops them",
                    False,
                    key=K.EPISODE_ENDS,
                )
            )
        n = int(raw[k - 1]) if k else 0
        for key, spec in self._keys.items():
            arr = data[key]
            if tuple(arr.shape[1:]) != spec.shape:
                out.append(
                    Finding(
                        "shape",
                        f"data/{key} has per-step shape {arr.shape[1:]}, schema says {spec.shape}",
                        True,
                    )
                )
            if not verdict.damage and arr.shape[0] > n:
                out.append(
                    Finding(
                        "tail",
                        f"data/{key} has an unfinished tail of {arr.shape[0] - n} steps past the last "
                        "episode",
                        False,
                        key=f"data/{key}",
                    )
                )
        meta = self.root[K.META_GROUP] if self._meta_arrays() else None
        for name in self._meta_arrays():
            m = meta[name]
            if m.shape[0] < k:
                out.append(
                    Finding(
                        "metadata",
                        f"meta/{name} has {m.shape[0]} entries for {k} episodes (metadata is written before "
                        "episode_ends, so no crash makes it shorter: damage)",
                        True,
                        key=f"meta/{name}",
                    )
                )
            elif m.shape[0] > k and not verdict.damage:
                out.append(
                    Finding(
                        "tail",
                        f"meta/{name} has {m.shape[0] - k} entries for unfinished episodes",
                        False,
                        key=f"meta/{name}",
                    )
                )
        return out

    def missing_chunks(self) -> list[Finding]:
        """Chunks that the finished episodes need and the store does not hold (a listing, no decoding),
        and chunk files cut short (a 16-byte header read each: ``integrity.truncated_blocks``).

        zarr would read each of them as its fill value -- zeros -- so a store with any is not fit to train
        on. Cheap enough for ``info`` and for every training run; :meth:`require_intact` raises on them.
        """
        data = self._data_arrays()
        raw, verdict, corrupt = self._ends_state(data)
        if corrupt is not None or verdict.damage:
            return []  # the finished steps are unknown; _structure() reports why
        ends = raw[: verdict.n_finished]
        n_steps, n_ep = (int(ends[-1]) if ends.size else 0), int(ends.size)
        out = []
        arrays = [(f"data/{k}", data[k], n_steps, "steps") for k in self._keys]
        meta = self.root[K.META_GROUP]
        for name in self._meta_arrays():
            # stores from before dense chunks legitimately omit an all-unknown success chunk
            if name != "episode_success" or self._dense_chunks:
                arrays.append((f"meta/{name}", meta[name], n_ep, "episodes"))
        for key, arr, n_rows, unit in arrays:
            for b in missing_blocks(arr, n_rows):
                rows = block_rows(arr, b[0])
                rows = (rows[0], min(rows[1], n_rows))
                eps = episode_range(ends, rows) if unit == "steps" else (rows[0], rows[1] - 1)
                hint = (
                    ""
                    if self._dense_chunks
                    else " (or all zeros in a store written before vlaflow kept those)"
                )
                file = chunk_file(self.path, arr, b)
                out.append(
                    Finding(
                        "missing_chunk",
                        f"{key} chunk {b[0]} ({where(rows, eps, unit)}) is missing: {file}; zarr would "
                        f"read it as fill values{hint}",
                        True,
                        key=key,
                        chunk=b[0],
                        file=file,
                        rows=rows,
                        episodes=eps,
                    )
                )
            for b, why in truncated_blocks(self.path, arr, n_rows):
                rows = block_rows(arr, b[0])
                rows = (rows[0], min(rows[1], n_rows))
                eps = episode_range(ends, rows) if unit == "steps" else (rows[0], rows[1] - 1)
                file = chunk_file(self.path, arr, b)
                out.append(
                    Finding(
                        "corrupt_chunk",
                        f"{key} chunk {b[0]} ({where(rows, eps, unit)}) is truncated: {file} has {why}",
                        True,
                        key=key,
                        chunk=b[0],
                        file=file,
                        rows=rows,
                        episodes=eps,
                    )
                )
        return out

    def findings(self) -> list[Finding]:
        """Everything the cheap checks find: structure, meta/episode_ends, missing chunks, leftovers."""
        out = self._structure() + self.missing_chunks()
        partial = self._partial_files()
        if partial:
            out.append(
                Finding(
                    "partial",
                    f"{len(partial)} leftover partial chunk write(s) of killed writers (*{PARTIAL_SUFFIX}, "
                    f"e.g. {partial[0]}); `vlaflow repair` removes them",
                    False,
                )
            )
        return out

    def problems(self) -> list[str]:
        """Everything wrong with the store, as human-readable lines (empty when healthy)."""
        return [f.message for f in self.findings()]

    def require_intact(self) -> None:
        """Raise a StoreError if the store is damaged or misses chunks (for ``info`` and training)."""
        damage = [f for f in self._structure() + self.missing_chunks() if f.damage]
        if damage:
            listed = "; ".join(f.message for f in damage[:5])
            more = f"; and {len(damage) - 5} more" if len(damage) > 5 else ""
            raise StoreError(
                f"{self.path}: the store is damaged and will not be used: {listed}{more}. "
                f"Run `vlaflow validate {self.path}` for a full report"
            )

    def _partial_files(self) -> list[str]:
        if is_remote(self.path):
            return []
        local = local_path(self.path)
        return sorted(str(p) for p in local.rglob(f"*{PARTIAL_SUFFIX}") if p.is_file())

    def repair(self, *, dry_run: bool = False, backup_dir: str | os.PathLike | None = None) -> RepairResult:
        """Trim an unfinished tail (everything past the last finished episode); refuse damage.

        Only what a killed append leaves is removed: ``episode_ends`` fill values past the last committed
        episode, data rows past the last finished step, metadata entries past the last finished episode,
        and zarr's leftover ``*.partial`` files. The removed rows of every key and the removed metadata
        (task and source texts included) are saved first to ``<store>.repair-<time>.npz`` beside the store
        (or in ``backup_dir``), without pickled objects: ``numpy.load(path, allow_pickle=False)``.
        ``dry_run`` reports the same actions and changes nothing.
        """
        self._require_writable("repair")
        damage = [f for f in self._structure() + self.missing_chunks() if f.damage]
        if damage:
            raise StoreError(
                f"{self.path}: repair refuses: the store is damaged, not unfinished, and trimming would lose "
                f"finished episodes: "
                + "; ".join(f.message for f in damage[:5])
                + f". Nothing was changed. Restore the named files from a copy or re-ingest the source; "
                f"`vlaflow validate {self.path}` lists everything"
            )
        raw, verdict, _ = self._ends_state()
        k = verdict.n_finished
        n = int(raw[k - 1]) if k else 0
        ends = self.root[K.EPISODE_ENDS]
        actions, removed = [], {}
        if ends.shape[0] > k:
            actions.append(f"drop {ends.shape[0] - k} invalid entries of meta/episode_ends")
            removed["meta/episode_ends"] = raw[k:]
        for key in self._keys:
            arr = self.root[K.DATA_GROUP][key]
            if arr.shape[0] > n:
                actions.append(f"trim data/{key} from {arr.shape[0]} to {n} steps")
                removed[f"data/{key}"] = self._read(key, slice(n, arr.shape[0]))
        tables = {"episode_task_index": self.tasks, "episode_source_index": self._meta_strings("sources")}
        for name in self._meta_arrays():
            m = self.root[K.META_GROUP][name]
            if m.shape[0] > k:
                actions.append(f"trim meta/{name} from {m.shape[0]} to {k} episodes")
                removed[f"meta/{name}"] = np.asarray(m[k:])
                if name in tables:
                    table = tables[name]
                    text = [table[i] if 0 <= i < len(table) else "" for i in removed[f"meta/{name}"]]
                    removed[f"meta/{name.replace('_index', '')}"] = np.asarray(text, dtype=str)
        partial = self._partial_files()
        if partial:
            actions.append(f"remove {len(partial)} leftover partial chunk write(s) (*{PARTIAL_SUFFIX})")
        result = RepairResult(actions, None, dry_run)
        if dry_run or not actions:
            return result
        if removed:
            removed.update(
                store=np.asarray(self.path),
                first_step=np.asarray(n),
                first_episode=np.asarray(k),
                created=np.asarray(time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            )
            result.backup = save_backup(self._backup_path(backup_dir), removed)
        # episode_ends first (each intermediate state is again an unfinished tail); the dropped entries
        # are overwritten with fill values so that a later resize cannot bring stale ends back
        if ends.shape[0] > k:
            dense(ends)[k:] = ends.fill_value
            ends.resize((k,))
            ends.attrs["n_committed"] = k
        for name in self._meta_arrays():
            m = self.root[K.META_GROUP][name]
            if m.shape[0] > k:
                m.resize((k,))
        for key in self._keys:
            arr = self.root[K.DATA_GROUP][key]
            if arr.shape[0] > n:
                arr.resize((n, *arr.shape[1:]))
        for p in partial:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        return result

    def _backup_path(self, backup_dir: str | os.PathLike | None) -> str:
        """``<store name>.repair-<time>-<pid>.npz`` beside the store (a sibling URL for remote stores)."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        if is_remote(self.path):
            url = str(self.path).rstrip("/")
            name = f"{url.rsplit('/', 1)[-1]}.repair-{stamp}.npz"
            return f"{backup_dir}/{name}" if backup_dir is not None else f"{url.rsplit('/', 1)[0]}/{name}"
        local = local_path(self.path).absolute()
        return str(Path(backup_dir or local.parent) / f"{local.name}.repair-{stamp}.npz")


@dataclass
class RepairResult:
    """What :meth:`EpisodeStore.repair` did (or, for a dry run, would do); iterates over the actions."""

    actions: list[str]
    backup: str | None = None  # the .npz holding everything removed; None when nothing was removed
    dry_run: bool = False

    def __iter__(self) -> Iterator[str]:
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def summary(self) -> str:
        if not self.actions:
            return "nothing to repair"
        head = "would" if self.dry_run else "did"
        lines = [f"{head}: {a}" for a in self.actions]
        if self.backup:
            lines.append(
                f"removed rows and metadata saved to {self.backup} (numpy.load(..., allow_pickle=False))"
            )
        return "\n".join(lines)
