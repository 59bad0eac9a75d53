"""What an episode store's files say about its health, without trusting them.

Two questions a reader cannot leave to zarr:

- **Is a chunk really there?** zarr reads a chunk object that does not exist as its fill value, so a
  deleted chunk file reads as zeros (or -1 in ``meta/``). The chunk grid that the finished steps need is
  compared with the chunk objects the store lists (:func:`missing_chunks`): a listing, no decoding.
  Stores written since the ``dense_chunks`` schema flag store every chunk, even one equal to the fill
  value, so for them a missing chunk is always damage.
- **Is the end of ``meta/episode_ends`` an unfinished append or damage?** (:func:`check_episode_ends`)
  An append writes data first, metadata next, ``episode_ends`` last, and records the number of committed
  episodes (``n_committed`` in the attributes of ``meta/episode_ends``) only after that. The one crash
  that leaves invalid entries -- a kill between ``episode_ends``' resize and its chunk write -- leaves
  *fill values at the end*, past the last committed episode, possibly in a chunk that was never written.
  That, and only that, is an unfinished tail. A bad value followed by valid-looking ones, a bad value that
  is not the fill value, or fill values or a missing chunk where committed episodes were, is damage:
  readers refuse it and ``repair`` will not trim it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import zarr
from zarr.core.sync import sync  # zarr's own bridge from its async store API; used for listing only

PARTIAL_SUFFIX = ".partial"  # zarr's LocalStore writes <chunk>.<uuid>.partial, then renames it


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a store."""

    kind: str  # episode_ends | missing_chunk | corrupt_chunk | tail | metadata | shape | nonfinite | partial
    message: str  # one line for a person, naming the array, chunk, file and episodes
    damage: bool  # True: the data is not what was written (repair refuses); False: an unfinished tail
    key: str = ""  # array path inside the store, e.g. "data/action" or "meta/episode_ends"
    chunk: int | None = None  # chunk index along time (along episodes in meta/)
    file: str = ""  # the chunk object, a local path or URL
    rows: tuple[int, int] | None = None  # [start, stop) along time that the chunk covers
    episodes: tuple[int, int] | None = None  # first and last finished episode with steps in the chunk


def chunk_len(arr: zarr.Array) -> int:
    return int((arr.shards or arr.chunks)[0])


def _grid(arr: zarr.Array) -> tuple[int, ...]:
    per = arr.shards or arr.chunks
    return tuple(-(-int(s) // int(c)) for s, c in zip(arr.shape, per, strict=True))


def blocks(arr: zarr.Array, n_rows: int | None = None) -> Iterator[tuple[int, ...]]:
    """Chunk coordinates covering rows [0, n_rows) (default: the whole array), time-major."""
    grid = _grid(arr)
    if not grid:
        return iter(())
    c = chunk_len(arr)
    n_t = grid[0] if n_rows is None else min(grid[0], -(-int(n_rows) // c))
    return itertools.product(range(n_t), *(range(g) for g in grid[1:]))


def chunk_file(store_path: str, arr: zarr.Array, coords: tuple[int, ...]) -> str:
    key = arr.metadata.encode_chunk_key(coords)
    if "://" in store_path and not store_path.startswith("file://"):
        return f"{store_path.rstrip('/')}/{arr.path}/{key}"
    local = store_path[len("file://") :] if store_path.startswith("file://") else store_path
    return os.path.join(local, arr.path, key)


def listed_keys(arr: zarr.Array) -> list[str]:
    """Every object stored under the array, relative to it (chunk keys, zarr.json, leftovers)."""
    prefix = arr.store_path.path.rstrip("/") + "/"

    async def collect() -> list[str]:
        return [k[len(prefix) :] async for k in arr.store_path.store.list_prefix(prefix)]

    return sync(collect())


def missing_blocks(arr: zarr.Array, n_rows: int | None = None) -> list[tuple[int, ...]]:
    """Chunks the rows [0, n_rows) need that the store does not hold."""
    present = set(listed_keys(arr))
    return [b for b in blocks(arr, n_rows) if arr.metadata.encode_chunk_key(b) not in present]


def _blosc_framed(arr: zarr.Array) -> bool:
    """Whether each chunk file of ``arr`` is exactly one blosc frame (vlaflow's stores, most v2 stores)."""
    md = arr.metadata
    codecs = getattr(md, "codecs", None)
    if codecs is not None:  # zarr v3: an array->bytes codec, then the bytes->bytes ones
        rest = [c for c in codecs if type(c).__name__ != "BytesCodec"]
        return len(rest) == 1 and type(rest[0]).__name__ == "BloscCodec"
    comp = getattr(md, "compressor", None)
    return comp is not None and getattr(comp, "codec_id", "") == "blosc" and not getattr(md, "filters", None)


def truncated_blocks(store_path: str, arr: zarr.Array, n_rows: int | None = None) -> list[tuple[tuple, str]]:
    """Chunk files (of the rows [0, n_rows)) whose length disagrees with their blosc header: (coords, why).

    Why a header check and not only decoding: blosc stores incompressible data (noisy camera images) as a
    raw copy and its decoder trusts the header's size, so a truncated chunk of that kind can decode without
    an error into garbage. Reading 16 bytes per chunk finds it for certain, cheaply (local stores only).
    """
    if "://" in store_path and not store_path.startswith("file://"):
        return []
    if not _blosc_framed(arr):
        return []
    out = []
    for b in blocks(arr, n_rows):
        path = chunk_file(store_path, arr, b)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:  # missing: missing_blocks reports it
            continue
        if len(head) < 16:
            out.append((b, f"{size} bytes, shorter than a blosc header"))
        elif int.from_bytes(head[12:16], "little") != size:
            out.append(
                (b, f"{size} bytes where its blosc header says {int.from_bytes(head[12:16], 'little')}")
            )
    return out


def partial_files(arr: zarr.Array) -> list[str]:
    return [k for k in listed_keys(arr) if k.endswith(PARTIAL_SUFFIX)]


def block_rows(arr: zarr.Array, t: int) -> tuple[int, int]:
    c = chunk_len(arr)
    return t * c, min((t + 1) * c, int(arr.shape[0]))


def episode_range(ends: np.ndarray | None, rows: tuple[int, int]) -> tuple[int, int] | None:
    """First and last finished episode with steps in rows [a, b); None when they hold none."""
    if ends is None or not len(ends) or rows[0] >= int(ends[-1]) or rows[1] <= rows[0]:
        return None
    first = int(np.searchsorted(ends, rows[0], side="right"))
    last = int(np.searchsorted(ends, min(rows[1], int(ends[-1])) - 1, side="right"))
    return first, last


def where(rows: tuple[int, int], episodes: tuple[int, int] | None, unit: str = "steps") -> str:
    span = f"{unit} {rows[0]}..{rows[1] - 1}"
    if episodes is None:
        return f"{span}, no finished episode"
    return f"{span}, episodes {episodes[0]}..{episodes[1]}"


def read_or_locate(arr: zarr.Array, sel: slice) -> tuple[np.ndarray | None, tuple[int, ...] | None, str]:
    """``arr[sel]``, or (None, the first chunk in ``sel`` that cannot be decoded, the error)."""
    try:
        return np.asarray(arr[sel]), None, ""
    except Exception as e:  # blosc/zstd raise RuntimeError, zarr ValueError: find which chunk it was
        first_error = f"{type(e).__name__}: {e}"
        _drain_zarr_tasks()
    c = chunk_len(arr)
    start, stop, _ = sel.indices(int(arr.shape[0]))
    for b in blocks(arr, stop):
        if b[0] < start // c:
            continue
        try:
            arr.get_block_selection(b)
        except Exception as e:
            return None, b, f"{type(e).__name__}: {e}"
    return None, None, first_error


def _drain_zarr_tasks(timeout: float = 10.0) -> None:
    """Let the sibling decodes of a failed multi-chunk read finish.

    zarr decodes chunks concurrently; when one fails, the others are left running in zarr's event loop,
    and a process that exits soon after (a CLI printing the error) prints hundreds of lines of "Task was
    destroyed but it is pending" / "cannot schedule new futures after shutdown" over the real message.
    """

    async def drain() -> None:
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if others:
            done, _ = await asyncio.wait(others, timeout=timeout)
            for t in done:  # retrieve their errors: they are the failure we already report
                if not t.cancelled():
                    t.exception()

    sync(drain())


@dataclass(frozen=True)
class EndsCheck:
    """The verdict on ``meta/episode_ends``: how many episodes are finished, or what is damaged."""

    n_finished: int  # entries [0, n_finished) are valid finished episodes
    n_tail: int  # fill-value entries after them, from a killed append (0 when none)
    damage: str | None  # None, or what is wrong, naming the entry or chunk
    lost_chunks: tuple[int, ...] = ()  # damage: missing episode_ends chunks that held entries


def check_episode_ends(
    raw: np.ndarray,
    fill: int,
    n_data: int,
    chunk: int,
    missing: list[int],
    n_committed: int | None,
) -> EndsCheck:
    """Classify ``raw`` (all of meta/episode_ends as read, fill values included); see the module doc.

    ``missing``: indices of episode_ends chunks absent from the store; ``n_committed``: the committed
    count recorded after the last finished append, or None for a store written before it was recorded.
    """
    n = int(raw.shape[0])
    prev = np.concatenate([[0], raw[:-1]]) if n else raw
    valid = (raw > prev) & (raw <= n_data)
    bad = np.flatnonzero(~valid)
    k = int(bad[0]) if bad.size else n
    if k == n:
        return EndsCheck(n, 0, None)
    tail = raw[k:]
    not_fill = np.flatnonzero(tail != fill)
    lost = [c for c in missing if c * chunk < n]
    if lost:
        c = lost[0]
        chunk_msg = (
            f"meta/episode_ends chunk {c} (entries {c * chunk}..{min((c + 1) * chunk, n) - 1}) is missing"
        )
    if not_fill.size:
        v = int(raw[k])
        if v == fill:
            why = "a fill value (never written)"
        elif v <= int(prev[k]):
            why = f"not after the previous end {int(prev[k])}"
        else:
            why = f"past the end of the data (data has {n_data} steps)"
        after = int(np.count_nonzero(tail[1:] != fill))  # written after the bad entry
        msg = f"meta/episode_ends[{k}] = {v} is {why}"
        if after:
            msg += (
                f", followed by {after} valid-looking (written) entries: this is damage, not an unfinished "
                f"append (those {n - k - 1} episodes would be lost by trimming)"
            )
        else:
            msg += f"; entries {k}..{n - 1} are not valid episode ends and are not fill values"
        if lost:
            msg += f"; {chunk_msg}"
        return EndsCheck(k, 0, msg, tuple(lost))
    # fill values only, from entry k on: a killed append -- unless committed episodes were there
    if n_committed is not None and k < n_committed:
        what = chunk_msg if lost else f"entries {k}..{n - 1} read as fill values"
        return EndsCheck(
            k,
            0,
            f"{what}, but {n_committed} episodes were committed: meta/episode_ends lost entries "
            f"{k}..{n_committed - 1} (damage, not an unfinished append)",
            tuple(lost),
        )
    if lost and n_committed is None:
        return EndsCheck(
            k,
            0,
            f"{chunk_msg} (this store does not record its committed episode count, so a missing "
            "chunk cannot be told from an unfinished append; treated as damage)",
            tuple(lost),
        )
    return EndsCheck(k, n - k, None)


def save_backup(path: str, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` as a compressed .npz (no pickled objects) atomically, locally or via fsspec."""
    if "://" in path and not path.startswith("file://"):
        with fsspec.open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path
    local = path[len("file://") :] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, local)
    return local
