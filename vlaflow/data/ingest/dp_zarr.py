"""diffusion_policy ReplayBuffer zarr stores (zarr v2 or v3): ``data/<key>`` + ``meta/episode_ends``.

Keys are renamed to the vlaflow convention: ``action`` stays, image arrays (N, h, w, 1|3) become
``obs.image.<name>`` as uint8 (float images in 0..255 or 0..1 are converted exactly, never rescaled
silently), everything else becomes ``obs.<name>``. PushT's layout (state, keypoint, img, n_contacts,
action) is recognized: ``img`` becomes the ``top`` camera and ``obs.agent_pos`` (= state[:, :2]) is added,
the agent position that the Diffusion Policy paper's low-dim and image observations use.
``--key-map src=dst,...`` overrides any of this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

import vlaflow.keys as K
from vlaflow.data.integrity import chunk_file, missing_blocks, read_or_locate
from vlaflow.data.store import EpisodeStore, KeySpec, atomic_store
from vlaflow.errors import IngestError

FORMAT = "dp-zarr"
PUSHT_KEYS = {"action", "state", "keypoint", "img", "n_contacts"}
PUSHT_INSTRUCTION = "push the T-shaped block onto the T-shaped target"
_BLOCK_BYTES = 256 * 1024 * 1024


def detect(src: Path) -> bool:
    src = Path(src)
    return src.is_dir() and (src / "data").is_dir() and (src / "meta" / "episode_ends").exists()


def _is_image(arr: zarr.Array) -> bool:
    return arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] >= 16 and arr.shape[2] >= 16


def _default_name(name: str, arr: zarr.Array, pusht: bool) -> str:
    if name == "action":
        return K.ACTION
    if _is_image(arr):
        return K.image_key("top" if (pusht and name == "img") else name)
    return f"{K.OBS_PREFIX}{name}"


def _to_uint8(block: np.ndarray, src: Path, name: str, scale: float) -> np.ndarray:
    if block.dtype == np.uint8:
        return block
    x = block.astype(np.float32) * scale
    if not np.isfinite(x).all():
        raise IngestError(f"{src}: data/{name}: image has non-finite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.5 or hi > 255.5:
        raise IngestError(f"{src}: data/{name}: image values must lie in 0..255 (or 0..1), found {lo}..{hi}")
    return np.rint(x).astype(np.uint8)


def ingest(
    src: str | Path,
    dest: str | Path,
    key_map: dict | None = None,
    fps: float | None = None,
    task: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    src = Path(src)
    if is_vlaflow_store(src):
        return _copy_vlaflow_store(src, dest, key_map or {}, fps, task, overwrite, progress)
    try:
        root = zarr.open_group(str(src), mode="r")
        data = root["data"]
        ends = np.asarray(root["meta"]["episode_ends"][:], dtype=np.int64)
        arrays = dict(sorted(data.arrays()))  # listing order is the filesystem's; make errors reproducible
    except Exception as e:  # corrupt metadata surfaces as many exception types inside zarr
        raise IngestError(
            f"{src}: cannot read as a diffusion_policy zarr store ({type(e).__name__}: {e})"
        ) from e
    if not arrays:
        raise IngestError(f"{src}: data/ holds no arrays")
    if ends.ndim != 1 or ends.size == 0:
        raise IngestError(f"{src}: meta/episode_ends must be a non-empty 1-D array, found shape {ends.shape}")
    lengths = np.diff(ends, prepend=0)
    if (lengths <= 0).any():
        i = int(np.flatnonzero(lengths <= 0)[0])
        raise IngestError(
            f"{src}: meta/episode_ends is not strictly increasing at episode {i} "
            f"({ends[max(i - 1, 0)]}, {ends[i]})"
        )
    n = int(ends[-1])
    for name, arr in arrays.items():
        if arr.shape[0] < n:
            raise IngestError(f"{src}: data/{name} has {arr.shape[0]} steps, meta/episode_ends says {n}")
    if "action" not in arrays and "action" not in (key_map or {}):
        raise IngestError(f"{src}: no data/action array; arrays present: {sorted(arrays)}")
    unknown = sorted(set(key_map or {}) - set(arrays))
    if unknown:
        raise IngestError(
            f"{src}: --key-map names {unknown}, which the source does not have; its arrays: {sorted(arrays)}"
        )
    for name, arr in arrays.items():  # zarr reads an absent chunk as fill values: that is not data
        gone = missing_blocks(arr, n)
        if gone:
            raise IngestError(
                f"{src}: data/{name} chunk {gone[0][0]} is missing ({chunk_file(str(src), arr, gone[0])}"
                f"{f' and {len(gone) - 1} more' if len(gone) > 1 else ''}); zarr would read it as zeros. "
                "Restore it from a copy of the dataset"
            )

    pusht = PUSHT_KEYS <= set(arrays)
    key_map = dict(key_map or {})
    names = {name: key_map.get(name, _default_name(name, arr, pusht)) for name, arr in arrays.items()}
    specs: dict[str, KeySpec] = {}
    for name, arr in arrays.items():
        dtype = (
            "uint8"
            if K.is_image(names[name])
            else ("float32" if arr.dtype == np.float64 and name == "img" else arr.dtype.name)
        )
        specs[names[name]] = KeySpec(dtype, tuple(arr.shape[1:]))
    if pusht and "obs.agent_pos" not in specs:
        specs["obs.agent_pos"] = KeySpec("float32", (2,), names=["x", "y"])

    out: dict[str, np.ndarray] = {}
    with tqdm(total=n * len(arrays), unit="row", desc=f"read {src.name}", disable=not progress) as bar:
        for name, arr in arrays.items():
            key = names[name]
            row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
            step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
            if arr.chunks[0] > 0:
                step = max(arr.chunks[0], step // arr.chunks[0] * arr.chunks[0])
            buf = np.empty((n, *arr.shape[1:]), dtype=specs[key].dtype)
            scale = None
            for i in range(0, n, step):
                block, bad, err = read_or_locate(arr, slice(i, min(n, i + step)))
                if block is None:
                    where_ = f"chunk {bad[0]} ({chunk_file(str(src), arr, bad)})" if bad else "a chunk"
                    raise IngestError(f"{src}: data/{name} {where_} cannot be decoded ({err})")
                if K.is_image(key):
                    if scale is None:
                        scale = 255.0 if block.dtype != np.uint8 and float(block.max()) <= 1.0 else 1.0
                    block = _to_uint8(block, src, name, scale)
                elif not np.isfinite(block).all():
                    r = i + int(np.argwhere(~np.isfinite(block.reshape(len(block), -1)))[0][0])
                    raise IngestError(
                        f"{src}: data/{name}: non-finite value at step {r} (episode "
                        f"{int(np.searchsorted(ends, r, side='right'))})"
                    )
                buf[i : i + len(block)] = block
                bar.update(len(block))
            out[key] = buf
    if pusht and "obs.agent_pos" not in out:
        out["obs.agent_pos"] = np.ascontiguousarray(out[names["state"]][:, :2])

    text = task if task is not None else (PUSHT_INSTRUCTION if pusht else "")
    attrs = {"source": {"format": FORMAT, "path": str(src.resolve()), "key_map": names}}
    with atomic_store(dest, specs, fps or 10.0, attrs=attrs, overwrite=overwrite) as store:
        store.append_episodes(
            out, lengths, [text] * len(lengths), [f"diffusion_policy:{src.name}"] * len(lengths)
        )
    return {
        "n_episodes": int(len(lengths)),
        "n_steps": n,
        "keys": {k: list(s.shape) for k, s in specs.items()},
    }


def is_vlaflow_store(src: Path) -> bool:
    """A vlaflow episode store (its schema in the root attributes), not a diffusion_policy one."""
    try:
        return "vlaflow" in zarr.open_group(str(src), mode="r").attrs
    except Exception:  # not a zarr group: the diffusion_policy path reports what is wrong
        return False


def _copy_vlaflow_store(
    src: Path, dest, key_map: dict, fps: float | None, task: str | None, overwrite: bool, progress: bool
) -> dict:
    """Ingest of a vlaflow store: a copy (keys renamed by ``key_map``, tasks replaced by ``task``), through
    the store's own reader, so a damaged source (missing or undecodable chunks, a bad episode_ends entry)
    is refused with its own error and never copied as zeros."""
    store = EpisodeStore.open(src)  # refuses damage
    store.require_intact()  # and missing chunks
    unknown = sorted(set(key_map) - set(store.keys))
    if unknown:
        raise IngestError(
            f"{src}: --key-map names {unknown}, which the source does not have; its keys: "
            f"{sorted(store.keys)}"
        )
    if fps is not None and store.fps is not None and abs(fps - store.fps) > 1e-9:
        raise IngestError(f"{src}: the store records {store.fps:g} fps; --fps {fps:g} disagrees")
    names = {k: key_map.get(k, k) for k in store.keys}
    specs = {names[k]: s for k, s in store.keys.items()}
    metas = [store.episode_meta(i) for i in range(store.n_episodes)]
    attrs = {**store.attrs, "source": {"format": "vlaflow", "path": str(src.resolve()), "key_map": names}}
    with atomic_store(dest, specs, store.fps or fps or 10.0, attrs=attrs, overwrite=overwrite) as out:
        for i in tqdm(range(store.n_episodes), desc=f"copy {src.name}", unit="ep", disable=not progress):
            m = metas[i]
            ep = {names[k]: v for k, v in store.get_episode(i).items()}
            out.append_episode(
                ep, task=m["task"] if task is None else task, source=m["source"], success=m["success"]
            )
    return {
        "n_episodes": store.n_episodes,
        "n_steps": store.n_steps,
        "keys": {k: list(s.shape) for k, s in specs.items()},
    }
