"""How a benchmark was run: command, machine, versions — recorded beside every result."""

from __future__ import annotations

import os
import sys

from vlaflow.runinfo import git_commit, machine, package_versions, utc_now


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
    m = machine()
    m["load_avg_at_start"] = m.pop("load_avg")
    return {
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "", *sys.argv[1:]]).strip(),
        "when": utc_now(),
        "git_commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
        "machine": m,
        "versions": package_versions(packages),
    }
