"""Ingest adapters, one module per source format.

Each module defines::

    FORMAT: str                                   # the --format name
    def detect(src: Path) -> bool                 # cheap sniffing for --format auto
    def ingest(src, dest, *, <typed options>, overwrite=False, progress=True) -> dict
                                                  # writes dest atomically (vlaflow.data.store.atomic_store);
                                                  # returns a summary {"n_episodes", "n_steps", ...}

The command-line flags of each format, and their parsing into ``ingest``'s keyword options, live in
:mod:`vlaflow.cli.data` (a new format adds its flags there).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from vlaflow.errors import IngestError

FORMATS: dict[str, str] = {
    "dp-zarr": "vlaflow.data.ingest.dp_zarr",
    "lerobot": "vlaflow.data.ingest.lerobot",
    "robosuite-hdf5": "vlaflow.data.ingest.robosuite_hdf5",
    "rosbag2": "vlaflow.data.ingest.rosbag2",
}


def adapter(fmt: str) -> ModuleType:
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)} (or 'auto')")
    return importlib.import_module(FORMATS[fmt])


def detect_format(src: str | Path) -> str:
    path = Path(src)
    if not path.exists():
        raise IngestError(f"{src}: no such file or directory")
    unavailable = []
    for fmt in FORMATS:
        try:
            mod = adapter(fmt)
        except ModuleNotFoundError as e:  # an optional dependency of that adapter is not installed
            unavailable.append(f"{fmt} ({e.name} not installed)")
            continue
        if mod.detect(path):
            return fmt
    raise IngestError(
        f"{src}: cannot tell its format (looked for: diffusion_policy zarr with data/ and meta/episode_ends; "
        "LeRobot meta/info.json; robosuite hdf5 with data/demo_*; rosbag2 metadata.yaml, .db3 or .mcap). "
        f"Pass --format explicitly, one of: {', '.join(FORMATS)}"
        + (f". Unavailable here: {', '.join(unavailable)}" if unavailable else "")
    )
