"""Shared fixtures. Nothing here downloads; shared data is read from ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PUSHT_ZARR = SHARED_DATA / "pusht_cchi_v7" / "pusht_cchi_v7_replay.zarr"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test with a clear reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared dataset not found: {p} (expected ../shared/data beside the repository)")
    return p


@pytest.fixture(scope="session")
def pusht_store(tmp_path_factory) -> Path:
    """The 206 human PushT demos ingested once per test session (vlaflow keys, uint8 images)."""
    from vlaflow.data.ingest import dp_zarr

    src = shared("pusht_cchi_v7", "pusht_cchi_v7_replay.zarr")
    dest = tmp_path_factory.mktemp("pusht") / "pusht.zarr"
    dp_zarr.ingest(src, dest, progress=False)
    return dest
