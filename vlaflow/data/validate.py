"""Full validation of an episode store: the cheap checks plus decoding every chunk of every array.

Why decode everything: a truncated or bit-rotten chunk is found only by decompressing it, whatever its
dtype (images and integer metadata too, not only floats); and a missing chunk is found only by the listing,
because zarr reads it as fill values. Each finding names the file, the array, the chunk index and the
episodes the chunk covers, so that a person can restore exactly that file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

import vlaflow.keys as K
from vlaflow.data.integrity import Finding, block_rows, blocks, chunk_file, episode_range, where
from vlaflow.data.lock import describe, read_lock
from vlaflow.data.siblings import sibling_notes
from vlaflow.data.store import EpisodeStore
from vlaflow.data.store_checks import is_remote, local_path


@dataclass
class ValidationReport:
    """What :func:`validate_store` found."""

    path: str
    n_episodes: int | None  # finished episodes; None when meta/episode_ends is damaged
    n_steps: int | None
    findings: list[Finding] = field(default_factory=list)
    chunks_read: int = 0  # chunks decoded (missing ones are not counted)
    writer: dict | None = None  # the holder of the store's writer lock, if any (see vlaflow.data.lock)
    notes: list[str] = field(default_factory=list)  # leftovers of killed writers beside it (not damage)

    @property
    def ok(self) -> bool:
        """Nothing at all to report."""
        return not self.findings

    @property
    def damaged(self) -> bool:
        """Something that ``repair`` refuses: the data is not what was written."""
        return any(f.damage for f in self.findings)

    def lines(self) -> list[str]:
        return [("DAMAGE: " if f.damage else "unfinished: ") + f.message for f in self.findings]

    def summary(self) -> str:
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        if self.ok:
            counts = f"{self.n_episodes} episodes, {self.n_steps} steps, {self.chunks_read} chunks decoded"
            held = f"; a writer holds the store ({describe(self.writer)})" if self.writer is not None else ""
            return f"{self.path}: OK ({counts}){held}{notes}"
        head = "damaged" if self.damaged else "unfinished tail (`vlaflow repair` trims it)"
        if self.writer is not None and not self.damaged:
            head += f"; a writer holds the store ({describe(self.writer)}): the tail may be its append"
        lines = [
            f"{self.path}: {head}: {len(self.findings)} problem(s):",
            *("  - " + x for x in self.lines()),
        ]
        return "\n".join(lines) + notes


def validate_store(store: EpisodeStore | str | os.PathLike, *, progress: bool = True) -> ValidationReport:
    """Check ``store`` completely; never raises for damage, only for a path that is not a store."""
    if not isinstance(store, EpisodeStore):
        store = EpisodeStore.open(store, check=False)
    findings = store.findings()
    raw, verdict, _ = store._ends_state()
    ends = None if verdict.damage else raw[: verdict.n_finished]
    n_steps = (int(ends[-1]) if ends.size else 0) if ends is not None else None
    known = {(f.key, f.chunk) for f in findings if f.kind in ("missing_chunk", "corrupt_chunk")}
    arrays = [(f"data/{k}", store.root[K.DATA_GROUP][k], "steps") for k in store.keys]
    meta = store.root[K.META_GROUP]
    arrays += [(f"meta/{name}", arr, "episodes") for name, arr in sorted(meta.arrays())]
    work = [(key, arr, unit, b) for key, arr, unit in arrays for b in blocks(arr)]
    nonfinite: set[str] = set()
    read = 0
    for key, arr, unit, b in tqdm(work, desc=f"validate {store.path}", unit="chunk", disable=not progress):
        if (key, b[0]) in known:
            continue
        try:
            x = np.asarray(arr.get_block_selection(b))
        except Exception as e:  # blosc/zstd RuntimeError, zarr ValueError: name the file, not a traceback
            rows = block_rows(arr, b[0])
            eps = episode_range(ends, rows) if unit == "steps" else _meta_eps(rows, ends)
            file = chunk_file(store.path, arr, b)
            findings.append(
                Finding(
                    "corrupt_chunk",
                    f"{key} chunk {b[0]} ({where(rows, eps, unit)}) cannot be decoded: {file} "
                    f"({type(e).__name__}: {e})",
                    True,
                    key=key,
                    chunk=b[0],
                    file=file,
                    rows=rows,
                    episodes=eps,
                )
            )
            known.add((key, b[0]))
            continue
        read += 1
        if unit == "steps" and x.dtype.kind == "f" and key not in nonfinite:
            start = block_rows(arr, b[0])[0]
            finished = x[: max((n_steps if n_steps is not None else arr.shape[0]) - start, 0)]
            bad = (
                np.flatnonzero(~np.isfinite(finished.reshape(len(finished), -1)).all(1))
                if len(finished)
                else []
            )
            if len(bad):
                step = start + int(bad[0])
                eps = episode_range(ends, (step, step + 1))
                where_ = f" (episode {eps[0]})" if eps else ""
                findings.append(
                    Finding(
                        "nonfinite",
                        f"{key} has a non-finite value at step {step}{where_}",
                        True,
                        key=key,
                        chunk=b[0],
                        file=chunk_file(store.path, arr, b),
                        rows=(step, step + 1),
                        episodes=eps,
                    )
                )
                nonfinite.add(key)
    n_eps = int(ends.size) if ends is not None else None
    writer = None if is_remote(store.path) else read_lock(local_path(store.path))
    return ValidationReport(store.path, n_eps, n_steps, findings, read, writer, sibling_notes(store.path))


def _meta_eps(rows: tuple[int, int], ends: np.ndarray | None) -> tuple[int, int] | None:
    if ends is None or rows[0] >= len(ends):
        return None
    return rows[0], min(rows[1], len(ends)) - 1
