"""Shared pieces of the real-layer benchmarks: start processes on loopback DDS, stop them, read summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlaflow.real.dds import loopback_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "vlaflow.cli"]


def dds_env(threads: int = 1) -> dict:
    os.environ["CYCLONEDDS_URI"] = loopback_config()
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        CYCLONEDDS_URI=loopback_config(),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)
    p._log = f  # type: ignore[attr-defined]
    return p


def stop(p: subprocess.Popen, timeout: float = 30) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    p._log.close()  # type: ignore[attr-defined]
    return p.returncode


def wait_file(path: Path, timeout: float) -> dict:
    t_end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > t_end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)
    return json.loads(path.read_text())


def percentiles(values, qs=(50, 99)) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": float(np.percentile(v, q)) if len(v) else None for q in qs}
    out["mean"] = float(v.mean()) if len(v) else None
    out["max"] = float(v.max()) if len(v) else None
    out["n"] = int(len(v))
    return out
