"""``vlaflow distill --teacher CKPT --data STORE --out DIR``: a one-step consistency student from a teacher.

What is trained, and how the student is chosen: :mod:`vlaflow.train.objectives.distill` (the objective
on the one training loop). This module is the command line only.
"""

from __future__ import annotations

import argparse
import json

from vlaflow.atomic import OVERWRITE_HELP
from vlaflow.train.objectives.distill import distill, parse_dims


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory (diffusion or flow)")
    parser.add_argument("--data", required=True, help="episode store whose observations drive the teacher")
    parser.add_argument(
        "--out",
        required=True,
        help="output checkpoint directory for the student (must not exist; never the teacher or the store)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget (default 12)")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many updates (0 = budget only)")
    parser.add_argument("--batch-size", type=int, default=128, help="student minibatch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument(
        "--lr-decay",
        choices=("none", "cosine"),
        default="none",
        help="learning-rate schedule over the budget (steps or minutes, whichever ends first): constant "
        "(default) or cosine to zero, which helps a from-scratch student fit the teacher closely",
    )
    parser.add_argument(
        "--pool", type=int, default=4096, help="teacher pairs kept in the pool (default 4096)"
    )
    parser.add_argument(
        "--refresh", type=int, default=256, help="new teacher pairs generated every 10 updates (default 256)"
    )
    parser.add_argument(
        "--chain-weight", type=float, default=0.5, help="weight of the intermediate-state loss (default 0.5)"
    )
    parser.add_argument("--teacher-sampler", default="", help="teacher sampler (default: its config's)")
    parser.add_argument("--teacher-steps", type=int, default=0, help="teacher steps (default: its config's)")
    parser.add_argument(
        "--student-dims",
        default="",
        help="U-Net widths of a smaller student, e.g. 32,64,128 (default: the teacher's net and weights)",
    )
    parser.add_argument(
        "--student-net",
        default="",
        help="student head: mlp:WIDTHxBLOCKS (e.g. mlp:1024x3) or unet:D1,D2,D3 "
        "(default: the teacher's net and weights)",
    )
    parser.add_argument(
        "--student-init",
        choices=("auto", "teacher", "scratch"),
        default="auto",
        help="a narrower U-Net student starts from a channel subset of the teacher's weights (auto, "
        "teacher) or from random weights (scratch); other heads always start from scratch",
    )
    parser.add_argument(
        "--teacher-pairs",
        type=int,
        default=0,
        help="generate this many teacher pairs once, up front, and train on that fixed set "
        "(default 0: an on-the-fly pool of --pool pairs, --refresh new ones every 10 updates)",
    )
    parser.add_argument(
        "--teacher-cache",
        default="",
        help="file for the --teacher-pairs set (safetensors + JSON metadata; never a pickle): loaded when "
        "it exists (and was made by the same teacher, sampler, steps and store), else written after "
        "generation; a file in another format (e.g. an older torch.save cache) is refused, not loaded",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for windows and noise (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_distill(args: argparse.Namespace) -> int:
    summary = distill(
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        minutes=args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        pool=args.pool,
        refresh=args.refresh,
        chain_weight=args.chain_weight,
        teacher_sampler=args.teacher_sampler,
        teacher_steps=args.teacher_steps,
        student_dims=parse_dims(args.student_dims),
        student_net=args.student_net,
        teacher_pairs_n=args.teacher_pairs,
        teacher_cache=args.teacher_cache,
        student_init=args.student_init,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0
