"""``vlaflow imagine``: a policy's imagined episode beside its real one, as a video and an error plot.

    vlaflow imagine --world-model RUN/checkpoints/last --policy CKPT --task pusht --seed 100000 --out DIR

The work is :func:`vlaflow.sim.imagined.imagine`; this module turns flags into its parameters and prints.
"""

from __future__ import annotations

import argparse
import json

from vlaflow.atomic import OVERWRITE_HELP, fresh_directory
from vlaflow.cli.sim import _policy_sources, check_policy_arg
from vlaflow.sim.imagined import imagine


def add_imagine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-model", required=True, help="world-model checkpoint (vlaflow train-wm)")
    p.add_argument("--policy", required=True, help="policy checkpoint directory, onnx:EXPORT_DIR or random")
    p.add_argument("--task", required=True, help="the real task (must be the world model's own)")
    p.add_argument(
        "--seed", type=int, default=100000, help="episode seed: the real start both episodes share"
    )
    p.add_argument("--max-steps", type=int, default=None, help="step cap (default: the task's)")
    p.add_argument(
        "--out", required=True, help="directory for imagine.mp4, error_vs_horizon.png, imagine.json"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--device", default="cpu")


def run_imagine(args: argparse.Namespace) -> int:
    check_policy_arg(args.policy, args.device)
    sources = {**_policy_sources(args.policy), f"--world-model {args.world_model}": args.world_model}
    with fresh_directory(args.out, overwrite=args.overwrite, sources=sources) as out:
        summary = imagine(
            args.world_model,
            args.policy,
            args.task,
            args.seed,
            out,
            max_steps=args.max_steps,
            device=args.device,
        )
    short = {k: summary[k] for k in ("video", "plot", "n_frames", "real", "imagined")}
    print(json.dumps(short, indent=1))
    return 0
