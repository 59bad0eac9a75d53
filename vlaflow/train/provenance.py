"""What made a run: the data it trained on (path + fingerprint), the command line, versions and commit.

Every invocation of a run (the first and each ``--resume``) appends one entry to ``RUN/provenance.json``;
the newest entry also rides in every checkpoint's ``train_state.json``. The recorded data path is what
``vlaflow train --resume`` uses when no ``--data`` is given, and the fingerprint is what it verifies: a
store that changed since the run started (episodes appended, a key re-ingested) is refused rather than
silently continued on other data.

The fingerprint is cheap by design (no sample data is read): a hash of the store's schema (keys, dtypes,
shapes, fps), the episode boundaries, and each array's shape and chunking.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from vlaflow.runinfo import git_commit, package_versions, utc_now

PROVENANCE_FILE = "provenance.json"
PACKAGES = ("vlaflow", "torch", "numpy", "zarr", "safetensors", "transformers")


def store_fingerprint(store) -> str:
    """sha256 (first 16 hex digits) of an episode store's schema, episode ends and array layout."""
    doc = {
        "keys": {k: [s.dtype, list(s.shape)] for k, s in sorted(store.keys.items())},
        "fps": store.fps,
        "episode_ends": [int(x) for x in store.episode_ends],
        "arrays": {k: [list(store.array(k).shape), list(store.array(k).chunks)] for k in sorted(store.keys)},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def data_location(data: str | os.PathLike) -> str:
    """The store's location as recorded: an absolute local path, or the URL as given."""
    s = str(data)
    return s if "://" in s else str(Path(s).resolve())


def invocation(data: str | os.PathLike, resumed_from: int | None = None) -> dict:
    """One provenance entry for this process."""
    return {
        "utc": utc_now(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "data": data_location(data),
        "resumed_from_step": resumed_from,
        "versions": package_versions(PACKAGES),
        "commit": git_commit(),
        "python": sys.version.split()[0],
    }


def append(run_dir: Path, entry: dict) -> None:
    """Add ``entry`` to ``run_dir/provenance.json`` (rewritten whole through a temp file)."""
    path = Path(run_dir) / PROVENANCE_FILE
    runs = read(run_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"invocations": [*runs, entry]}, indent=1))
    os.replace(tmp, path)


def read(run_dir: Path) -> list[dict]:
    """The recorded invocations of a run (empty for a run made before provenance was recorded)."""
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("invocations", []))
    except (ValueError, AttributeError):
        return []


def recorded_data(run_dir: Path) -> str | None:
    """The data location the run last trained on (provenance.json, else the last checkpoint's state)."""
    runs = read(run_dir)
    if runs and runs[-1].get("data"):
        return str(runs[-1]["data"])
    ckpts = Path(run_dir) / "checkpoints"
    for name in ("last", *sorted((p.name for p in ckpts.glob("step_*")), reverse=True)):
        try:
            state = json.loads((ckpts / name / "train_state.json").read_text())
        except (OSError, ValueError):
            continue
        where = (state.get("provenance") or {}).get("data")
        if where:
            return str(where)
    return None
