"""How a benchmark was run: command, machine, versions — recorded beside every result."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata


def append_rows(path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON list at ``path`` (created if absent) and say so."""
    import json
    from pathlib import Path

    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=1) + "\n")
    print(f"appended {len(rows)} row(s) to {path}")


def run_info(packages: tuple[str, ...] = ("vlaflow", "numpy", "torch", "zarr")) -> dict:
    versions = {}
    for p in packages:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "", *sys.argv[1:]]).strip(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_start": load,
        },
        "versions": versions,
    }
