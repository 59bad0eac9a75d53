"""Data commands: ingest, info, validate, repair, export-lerobot."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vlaflow.data.ingest import FORMATS, adapter, detect_format
from vlaflow.errors import IngestError, StoreError

# ----------------------------------------------------------------------------- ingest


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Import a dataset into a vlaflow episode store (zarr). The destination is written to a temporary "
        "directory and moved into place only when complete, so a failed import leaves nothing behind."
    )
    p.add_argument("src", help="source dataset (directory or file)")
    p.add_argument("dest", help="destination store directory (or fsspec URL); must not exist")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="source format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    seen: set[str] = set()
    for fmt in FORMATS:
        try:
            mod = adapter(fmt)
        except ImportError:  # an adapter whose optional dependency is missing keeps the others usable
            continue
        group = p.add_argument_group(f"{fmt} options")
        _add_unique(group, mod, seen)


def _add_unique(group, mod, seen: set[str]) -> None:
    """Adapters may share option names (e.g. --task, --fps); the first definition wins."""
    real_add = group.add_argument

    def add(*names, **kw):
        fresh = [n for n in names if n not in seen]
        if len(fresh) != len(names):
            return None
        seen.update(names)
        return real_add(*names, **kw)

    group.add_argument = add
    mod.add_options(group)


def run_ingest(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise IngestError(f"{src}: no such file or directory")
    if "://" not in args.dest and Path(args.dest).exists() and not args.overwrite:
        raise IngestError(f"{args.dest}: destination exists (pass --overwrite to replace it)")
    fmt = detect_format(src) if args.format == "auto" else args.format
    mod = adapter(fmt)
    opts = mod.options_from_args(args)
    t0 = time.perf_counter()
    summary = mod.ingest(src, args.dest, overwrite=args.overwrite, progress=not args.no_progress, **opts)
    dt = time.perf_counter() - t0
    print(
        f"ingested {src} ({fmt}) -> {args.dest}: {summary['n_episodes']} episodes, "
        f"{summary['n_steps']} steps in {dt:.1f} s"
    )
    return 0


# ----------------------------------------------------------------------------- info


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store (directory or fsspec URL, e.g. file:///data/pusht.zarr)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("--no-stats", action="store_true", help="skip per-key statistics (faster on big stores)")


def store_summary(store, with_stats: bool = True) -> dict:
    lengths = store.episode_lengths
    tasks = store.tasks
    task_idx = store.episode_task_indices()
    task_counts = {t: int((task_idx == i).sum()) for i, t in enumerate(tasks)}
    successes = (
        [store.episode_meta(i)["success"] for i in range(store.n_episodes)] if not store.legacy else []
    )
    summary = {
        "path": store.path,
        "format": "diffusion_policy (v2, read-only)" if store.legacy else "vlaflow.episode_store",
        "n_episodes": store.n_episodes,
        "n_steps": store.n_steps,
        "fps": store.fps,
        "keys": {
            k: {"shape": list(s.shape), "dtype": s.dtype, "role": s.role} for k, s in store.keys.items()
        },
        "episode_length": {
            "min": int(lengths.min()) if lengths.size else 0,
            "median": float(np.median(lengths)) if lengths.size else 0,
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "tasks": task_counts,
        "success": {
            "true": sum(s is True for s in successes),
            "false": sum(s is False for s in successes),
            "unknown": sum(s is None for s in successes),
        },
        "problems": store.problems(),
    }
    if with_stats and store.n_steps:
        stats = {}
        for k, spec in store.keys.items():
            if len(spec.shape) == 3 and spec.dtype == "uint8":
                continue
            x = store.read(k).reshape(store.n_steps, -1).astype(np.float64)
            stats[k] = {
                "min": x.min(0).round(4).tolist(),
                "max": x.max(0).round(4).tolist(),
                "mean": x.mean(0).round(4).tolist(),
                "std": x.std(0).round(4).tolist(),
            }
        summary["stats"] = stats
    return summary


def run_info(args: argparse.Namespace) -> int:
    from vlaflow.data.store import EpisodeStore

    store = EpisodeStore.open(args.store)
    s = store_summary(store, with_stats=not args.no_stats)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    fps = f"{s['fps']:g} Hz" if s["fps"] else "unknown fps"
    el = s["episode_length"]
    print(f"{s['path']}  [{s['format']}]")
    print(
        f"  {s['n_episodes']} episodes, {s['n_steps']} steps, {fps}; episode length {el['min']}..{el['max']} "
        f"(median {el['median']:g})"
    )
    print("  keys:")
    width = max(len(k) for k in s["keys"])
    for k, d in s["keys"].items():
        line = f"    {k.ljust(width)}  {d['dtype']:>8} {tuple(d['shape'])!s:<14} {d['role']}"
        if "stats" in s and k in s["stats"]:
            st = s["stats"][k]
            fmt = lambda v: "[" + ", ".join(f"{x:.3g}" for x in v[:6]) + (", ...]" if len(v) > 6 else "]")  # noqa: E731
            line += f"  min {fmt(st['min'])} max {fmt(st['max'])}"
        print(line)
    if s["tasks"]:
        print("  tasks:")
        for t, c in s["tasks"].items():
            print(f"    {c:5d} x {t!r}")
    sc = s["success"]
    if sc["true"] or sc["false"]:
        print(f"  success: {sc['true']} yes, {sc['false']} no, {sc['unknown']} unknown")
    for p in s["problems"]:
        print(f"  PROBLEM: {p}")
    return 0


# ----------------------------------------------------------------------------- validate / repair


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to check")


def run_validate(args: argparse.Namespace) -> int:
    from vlaflow.data.store import EpisodeStore

    store = EpisodeStore.open(args.store)
    problems = store.problems()
    for k, spec in store.keys.items():
        if spec.dtype.startswith("float") and store.n_steps:
            x = store.read(k)
            if not np.isfinite(x).all():
                r = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0][0])
                problems.append(f"data/{k} has a non-finite value at step {r}")
    if problems:
        print(f"{args.store}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.store}: OK ({store.n_episodes} episodes, {store.n_steps} steps)")
    return 0


def add_repair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to repair in place")


def run_repair(args: argparse.Namespace) -> int:
    from vlaflow.data.store import EpisodeStore

    store = EpisodeStore.open(args.store, mode="a")
    done = store.repair()
    if not done:
        print(f"{args.store}: nothing to repair ({store.n_episodes} episodes)")
    for d in done:
        print(f"  {d}")
    if store.problems():
        raise StoreError(f"{args.store}: still damaged after repair: {store.problems()}")
    return 0


# ----------------------------------------------------------------------------- export-lerobot


def add_export_lerobot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to export")
    p.add_argument("out", help="output directory for the LeRobot v3.0 dataset (must not exist)")
    from vlaflow.data.video import CODECS

    p.add_argument(
        "--video-codec",
        default="h264",
        choices=list(CODECS),
        help="codec of the camera videos (h264-lossless round-trips images exactly)",
    )
    p.add_argument("--fps", type=float, default=None, help="frame rate, for stores that do not record one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run_export_lerobot(args: argparse.Namespace) -> int:
    from vlaflow.data.lerobot_export import export_lerobot

    summary = export_lerobot(
        args.store, args.out, fps=args.fps, video_codec=args.video_codec, overwrite=args.overwrite
    )
    print(f"exported {args.store} -> {args.out} (LeRobot v3.0): {json.dumps(summary)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
