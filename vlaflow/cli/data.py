"""Data commands: ``vlaflow ingest``, ``info``, ``validate``, ``repair``, ``export-lerobot``.

Every ingest adapter (:mod:`vlaflow.data.ingest`) takes typed keyword options; this module owns their
flags. The flags of all formats share one namespace, so a name two adapters use (``--task``, ``--fps``) is
declared once, in the first format's group, and handed to whichever format runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlaflow.atomic import OVERWRITE_HELP, aside_hint, check_destination
from vlaflow.data.ingest import FORMATS, adapter, detect_format
from vlaflow.data.ingest.robosuite_hdf5 import DEFAULT_CAMERAS
from vlaflow.data.ingest.rosbag2 import STAMP_MODES, parse_image_topic
from vlaflow.data.siblings import clean_siblings, restore_aside
from vlaflow.data.store import EpisodeStore
from vlaflow.data.summary import store_summary
from vlaflow.data.video import CODECS
from vlaflow.errors import IngestError, StoreError

# ----------------------------------------------------------------------------- ingest


def _dp_zarr_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--key-map",
        default="",
        help="dp-zarr: comma-separated src=dst renames, e.g. 'img=obs.image.front,state=obs.state'",
    )
    group.add_argument("--fps", type=float, default=None, help="dp-zarr: control rate (default 10, PushT's)")
    group.add_argument("--task", default=None, help="instruction text stored with every episode")


def _dp_zarr_options(args: argparse.Namespace) -> dict[str, Any]:
    key_map = {}
    for item in filter(None, (args.key_map or "").split(",")):
        if "=" not in item:
            raise IngestError(f"--key-map entry {item!r} is not of the form src=dst")
        a, b = item.split("=", 1)
        key_map[a.strip()] = b.strip()
    return {"key_map": key_map, "fps": args.fps, "task": args.task}


def _lerobot_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--skip-missing-video",
        action="store_true",
        help="lerobot: import without the cameras whose video files are missing (instead of stopping)",
    )


def _lerobot_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"skip_missing_video": bool(args.skip_missing_video)}


def _robosuite_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--regenerate-obs",
        action="store_true",
        help="robosuite-hdf5: rebuild the env and render observations (proprioception, object state, "
        "cameras) at every recorded state (needs robosuite)",
    )
    group.add_argument(
        "--cameras",
        default=",".join(DEFAULT_CAMERAS),
        help="robosuite-hdf5 --regenerate-obs: comma-separated camera names ('' for none)",
    )
    group.add_argument("--image-size", type=int, default=84, help="robosuite-hdf5 --regenerate-obs: H = W")
    group.add_argument(
        "--max-steps-per-episode", type=int, default=None, help="robosuite-hdf5: keep only the first N steps"
    )
    group.add_argument(
        "--max-episodes", type=int, default=None, help="robosuite-hdf5: keep only the first N demos"
    )
    group.add_argument(
        "--flip-dataset-images",
        action="store_true",
        help="robosuite-hdf5: flip stored obs/*_image vertically (files of raw robosuite renders; robomimic "
        "files are already upright)",
    )
    # --task and --fps are the dp-zarr group's (same meaning here; unset: from the source)


def _robosuite_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "regenerate_obs": bool(args.regenerate_obs),
        "cameras": tuple(c.strip() for c in str(args.cameras or "").split(",") if c.strip()),
        "image_size": int(args.image_size),
        "max_steps_per_episode": args.max_steps_per_episode,
        "max_episodes": args.max_episodes,
        "flip_dataset_images": bool(args.flip_dataset_images),
    }
    if args.task:
        opts["task"] = args.task
    if args.fps:
        opts["fps"] = float(args.fps)
    return opts


def _rosbag2_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--joint-topic", default=None, help="rosbag2: sensor_msgs/JointState topic -> obs.state"
    )
    group.add_argument(
        "--action-topic",
        default=None,
        help="rosbag2: JointState / Float64MultiArray / JointTrajectory topic -> action "
        "(unset: the next tick's joint state)",
    )
    group.add_argument(
        "--image-topic",
        action="append",
        default=[],
        metavar="TOPIC[:CAMERA]",
        help="rosbag2: Image or CompressedImage topic (repeatable); camera name defaults to the topic's",
    )
    group.add_argument("--rate", type=float, default=10.0, help="rosbag2: output rate (Hz), as-of aligned")
    group.add_argument("--episode-topic", default=None, help="rosbag2: each message starts an episode")
    group.add_argument("--stamp", choices=STAMP_MODES, default="header", help="rosbag2: message time source")
    # --task is the dp-zarr group's


def _rosbag2_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "joint_topic": args.joint_topic,
        "action_topic": args.action_topic,
        "image_topics": [parse_image_topic(s) for s in (args.image_topic or [])],
        "rate": float(args.rate),
        "episode_topic": args.episode_topic,
        "task": args.task or "",
        "stamp": args.stamp,
    }


Flags = Callable[[argparse._ArgumentGroup], None]
Options = Callable[[argparse.Namespace], dict[str, Any]]

# format -> (its flags, those flags -> keyword options of the adapter's ingest()); same keys as FORMATS
FORMAT_FLAGS: dict[str, tuple[Flags, Options]] = {
    "dp-zarr": (_dp_zarr_flags, _dp_zarr_options),
    "lerobot": (_lerobot_flags, _lerobot_options),
    "robosuite-hdf5": (_robosuite_flags, _robosuite_options),
    "rosbag2": (_rosbag2_flags, _rosbag2_options),
}


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Import a dataset into a vlaflow episode store (zarr). The destination is written to a temporary "
        "directory and moved into place only when complete, so a failed import leaves nothing behind."
    )
    p.add_argument("src", help="source dataset (directory or file)")
    p.add_argument("dest", help="destination store directory (or fsspec URL); must not exist")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="source format")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for fmt in FORMATS:
        FORMAT_FLAGS[fmt][0](p.add_argument_group(f"{fmt} options"))


def run_ingest(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise IngestError(f"{src}: no such file or directory{aside_hint(src)}")
    check_destination(
        args.dest, overwrite=args.overwrite, sources={"the source": src}, what="destination", flag="DEST"
    )
    fmt = detect_format(src) if args.format == "auto" else args.format
    mod = adapter(fmt)
    opts = FORMAT_FLAGS[fmt][1](args)
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


def _short(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v[:6]) + (", ...]" if len(v) > 6 else "]")


def _not_a_store_hint(path: str, command: str = "info") -> None:
    """A dataset of an ingestible format given to info / validate / view: say what it is and how to import
    it (then ``vlaflow COMMAND OUT.zarr``)."""
    p = Path(path)
    if "://" in path or not p.exists():
        return
    if p.is_dir() and (p / "data").is_dir() and (p / "meta" / "episode_ends").exists():
        return  # a store (or a diffusion_policy zarr, which opens read-only)
    try:
        fmt = detect_format(p)
    except IngestError:
        return
    names = {
        "lerobot": "a LeRobot dataset",
        "robosuite-hdf5": "a robosuite / robomimic hdf5 file",
        "rosbag2": "a ROS 2 bag",
    }
    raise StoreError(
        f"{path} is {names.get(fmt, fmt)}, not a vlaflow episode store; import it first: "
        f"`vlaflow ingest {path} OUT.zarr` (format {fmt}), then `vlaflow {command} OUT.zarr`"
    )


def run_info(args: argparse.Namespace) -> int:
    _not_a_store_hint(args.store)
    store = EpisodeStore.open(args.store)
    store.require_intact()  # a store with missing chunks reads zeros there: say so, do not summarise zeros
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
            line += f"  min {_short(st['min'])} max {_short(st['max'])}"
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
    for note in s["leftovers"]:
        print(f"  NOTE: {note}")
    return 0


# ----------------------------------------------------------------------------- validate / repair


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to check (every chunk of every key is read and decoded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = (
        "exit status: 0 sound, 1 an unfinished tail that `vlaflow repair` trims (a writer was killed "
        "mid-append), 2 damage that repair refuses (missing or undecodable chunks, bad episode_ends entries, "
        "non-finite values): each is named with its file, key, chunk and episode range"
    )


def run_validate(args: argparse.Namespace) -> int:
    from vlaflow.data.validate import validate_store

    _not_a_store_hint(args.store)
    report = validate_store(args.store, progress=not args.no_progress)
    print(report.summary())
    if report.ok:
        return 0
    return 2 if report.damaged else 1


def add_repair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to repair in place")
    p.add_argument("--dry-run", action="store_true", help="say what would be trimmed; change nothing")
    p.add_argument(
        "--backup-dir",
        default=None,
        help="where the .npz of everything removed goes (default: beside the store)",
    )
    p.add_argument(
        "--discard-leftovers",
        action="store_true",
        help="also remove temp stores of killed writers that hold finished episodes (kept by default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (of the decoding check)")
    p.epilog = (
        "repair only trims an unfinished tail (what a writer killed mid-append leaves past the last finished "
        "episode), after saving the removed rows and metadata to a .npz; it first decodes every chunk (as "
        "validate does) and refuses a damaged store, changing nothing then (exit 2). It also puts back a "
        "store that a killed --overwrite left moved aside (STORE missing, .STORE.old-* beside it) and "
        "removes the hidden temp directories of killed writers"
    )


def run_repair(args: argparse.Namespace) -> int:
    back = restore_aside(args.store, dry_run=args.dry_run)
    if back is not None:
        print(f"{'would put' if args.dry_run else 'put'} back {back} -> {args.store} (a killed replacement)")
        if args.dry_run:
            return 0
    from vlaflow.data.validate import validate_store

    store = EpisodeStore.open(args.store, mode="a", check=False)
    try:
        # every chunk decoded first: a truncated chunk is damage that trimming cannot mend
        report = validate_store(store, progress=not args.no_progress)
        if report.damaged:
            damage = [x for x in report.lines() if x.startswith("DAMAGE")]
            print(
                f"vlaflow repair: refused: {args.store} is damaged, not unfinished; nothing was changed:\n  "
                + "\n  ".join(damage)
                + "\nRestore the named files from a copy or re-ingest the source",
                file=sys.stderr,
            )
            return 2
        for line in clean_siblings(args.store, discard=args.discard_leftovers, dry_run=args.dry_run):
            print(line)
        try:
            result = store.repair(dry_run=args.dry_run, backup_dir=args.backup_dir)
        except StoreError as e:
            print(f"vlaflow repair: refused: {e}", file=sys.stderr)
            return 2
        if not result:
            print(f"{args.store}: nothing to repair ({store.n_episodes} episodes)")
        else:
            print(result.summary())
        if not args.dry_run and store.problems():
            raise StoreError(f"{args.store}: still damaged after repair: {store.problems()}")
    finally:
        store.close()
    return 0


# ----------------------------------------------------------------------------- export-lerobot


def add_export_lerobot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="episode store to export")
    p.add_argument("out", help="output directory for the LeRobot v3.0 dataset (must not exist)")
    p.add_argument(
        "--video-codec",
        default="h264",
        choices=list(CODECS),
        help="codec of the camera videos (h264-lossless round-trips images exactly)",
    )
    p.add_argument("--fps", type=float, default=None, help="frame rate, for stores that do not record one")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_export_lerobot(args: argparse.Namespace) -> int:
    from vlaflow.data.lerobot_export import export_lerobot  # pyarrow: info / validate stay quick without it

    check_destination(args.out, overwrite=args.overwrite, sources={"the store": args.store}, flag="OUT")
    summary = export_lerobot(
        args.store, args.out, fps=args.fps, video_codec=args.video_codec, overwrite=args.overwrite
    )
    print(f"exported {args.store} -> {args.out} (LeRobot v3.0): {json.dumps(summary)}")
    return 0
