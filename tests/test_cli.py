"""The ``vlaflow`` command package: every command resolves to its module, light commands stay torch-free,
and the ingest flags of each format map onto that adapter's typed ``ingest`` keywords."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO

from vlaflow.cli import COMMANDS
from vlaflow.data.ingest import FORMATS, adapter

PROBE = """
import contextlib, io, json, sys
from vlaflow.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        rc = main(sys.argv[1:])
    except SystemExit as e:  # --help
        rc = e.code
print(json.dumps([rc, sorted(m for m in ("torch", "matplotlib", "onnxruntime") if m in sys.modules)]))
"""


def _probe(*argv: str) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    rc, heavy = json.loads(res.stdout.strip().splitlines()[-1])
    return rc, heavy


def test_every_command_has_its_argument_and_run_functions():
    for name, (module, _) in COMMANDS.items():
        if not module.startswith("vlaflow.cli."):
            continue  # train / demo / distill: moved by their own change
        mod = importlib.import_module(module)
        fn = name.replace("-", "_")
        assert callable(getattr(mod, f"add_{fn}_arguments")) and callable(getattr(mod, f"run_{fn}")), name


def test_help_and_info_import_no_torch(tmp_path):
    from vlaflow.data.store import KeySpec, atomic_store

    store = tmp_path / "s.zarr"
    with atomic_store(store, keys={"action": KeySpec("float32", (2,))}, fps=10) as s:
        s.append_episode({"action": np.zeros((3, 2), np.float32)}, task="t")
    assert _probe("--help") == (0, [])
    assert _probe("info", str(store)) == (0, [])
    for cmd in ("ingest", "export", "bench", "compose", "eval", "collect"):
        assert _probe(cmd, "--help") == (0, []), cmd


def test_ingest_flags_map_onto_each_adapters_ingest_keywords(tmp_path):
    import argparse

    from vlaflow.cli.data import FORMAT_FLAGS, add_ingest_arguments

    assert list(FORMAT_FLAGS) == list(FORMATS)
    parser = argparse.ArgumentParser()
    add_ingest_arguments(parser)
    args = parser.parse_args(
        ["src", "dest", "--key-map", "img=obs.image.front", "--task", "go", "--fps", "5",
         "--cameras", "a, b", "--image-topic", "/cam/image_raw:front", "--rate", "20"]
    )  # fmt: skip
    opts = {fmt: FORMAT_FLAGS[fmt][1](args) for fmt in FORMATS}
    assert opts["dp-zarr"] == {"key_map": {"img": "obs.image.front"}, "fps": 5.0, "task": "go"}
    assert opts["lerobot"] == {"skip_missing_video": False}
    assert opts["robosuite-hdf5"]["cameras"] == ("a", "b") and opts["robosuite-hdf5"]["task"] == "go"
    assert opts["rosbag2"]["image_topics"] == [("/cam/image_raw", "front")]
    assert opts["rosbag2"]["rate"] == 20.0 and opts["rosbag2"]["task"] == "go"
    for fmt, kw in opts.items():
        params = inspect.signature(adapter(fmt).ingest).parameters
        assert set(kw) <= set(params), (fmt, set(kw) - set(params))
