"""``vlaflow view STORE [--episode N]``: one episode's cameras, curves, instruction and success.

The drawing is :mod:`vlaflow.data.view`; this module checks the destinations (the one overwrite rule of
:func:`vlaflow.atomic.check_destination`) before anything is read, and picks the outputs: ``--save
FILE.rrd`` (a Rerun recording, headless), ``--out DIR`` (mp4 per camera + PNG curves, no viewer needed),
``--spawn`` (the Rerun viewer; the default only where a display exists).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlaflow.atomic import OVERWRITE_HELP


def add_view_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="vlaflow episode store (other datasets: `vlaflow ingest` them first)")
    p.add_argument("--episode", type=int, default=0, help="episode index (0-based)")
    p.add_argument("--save", default=None, metavar="FILE.rrd", help="write a Rerun recording (no viewer)")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write <camera>.mp4, curves.png, frames.png, episode.json"
    )
    p.add_argument(
        "--spawn",
        action="store_true",
        help="open the Rerun viewer (needs a display; the default when neither --save nor --out is given "
        "and a display exists)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=0,
        help="store Rerun camera frames as JPEG of this quality (1..100; 0: raw, the default)",
    )
    p.add_argument("--overwrite", action="store_true", help=f"--save / --out: {OVERWRITE_HELP}")
    p.epilog = (
        "--save and --out follow the overwrite rule: an existing destination is refused unless --overwrite, "
        "and one that is, contains or lies inside STORE is refused always"
    )


def run_view(args: argparse.Namespace) -> int:
    from vlaflow.atomic import atomic_directory, check_destination
    from vlaflow.cli.data import _not_a_store_hint
    from vlaflow.data import view as V
    from vlaflow.errors import ConfigError

    if not 0 <= args.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {args.jpeg_quality}: expected 0 (raw) or 1..100")
    spawn = args.spawn
    if not (args.save or args.out or spawn):
        if not V.has_display():
            raise ConfigError(
                "no display here, so no viewer is spawned: pass --save FILE.rrd (open it with `rerun "
                "FILE.rrd` elsewhere) or --out DIR (mp4 + PNG, no viewer needed)"
            )
        spawn = True
    if spawn and not V.has_display():
        raise ConfigError(
            "--spawn: no display here (DISPLAY / WAYLAND_DISPLAY unset); write a recording with --save "
            "FILE.rrd and open it where there is one (`rerun FILE.rrd`), or use --out DIR"
        )
    sources = {"STORE": args.store}
    if args.save:
        check_destination(
            args.save, overwrite=args.overwrite, sources=sources, what="recording", flag="--save"
        )
    if args.out:
        check_destination(args.out, overwrite=args.overwrite, sources=sources, what="output directory")
    if args.save and args.out and Path(args.save).resolve().is_relative_to(Path(args.out).resolve()):
        raise ConfigError(f"--save {args.save} lies inside --out {args.out}: choose one outside it")
    _not_a_store_hint(args.store, "view")
    if spawn or args.save:
        V._rerun()  # a missing rerun-sdk is said before the episode is read
    v = V.load_episode(args.store, args.episode)
    print(
        f"episode {v.episode}: {v.n_steps} steps, cameras {list(v.cameras) or 'none'}, "
        f"curves {list(v.curves)}, task {v.task!r}, success {v.success}"
    )
    for key, why in v.skipped.items():
        print(f"  not drawn: {key} ({why})", file=sys.stderr)
    if args.save:
        paths = V.write_rrd(v, args.save, args.jpeg_quality)
        size = Path(args.save).stat().st_size
        print(
            f"wrote {args.save} ({size / 1e6:.1f} MB, {len(paths)} entities); "
            f"open it with `rerun {args.save}`"
        )
    if args.out:
        with atomic_directory(args.out, overwrite=args.overwrite, what="output directory") as tmp:
            summary = V.write_folder(v, tmp)
        print(f"wrote {args.out}: {', '.join(summary['files'])}")
        if not v.cameras:
            print("  (the store has no camera keys: no mp4)", file=sys.stderr)
    if spawn:
        V.spawn_viewer(v, args.jpeg_quality)
        print("spawned the Rerun viewer")
    return 0
