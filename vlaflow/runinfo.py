"""How a run was made: package versions, the git commit and the machine, recorded beside measured numbers."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata


def package_versions(packages) -> dict[str, str | None]:
    """{package: installed version or None}."""
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit(cwd: str | None = None) -> str:
    """Short commit hash of the checkout holding ``cwd`` (default: this package), '' outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd or os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    """Platform, processor, CPU count, Python version and the load average now."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": load,
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
