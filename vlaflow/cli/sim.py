"""Simulation commands: ``vlaflow collect``, ``teleop`` and ``eval``.

The work is done by :func:`vlaflow.sim.collect.collect`, :func:`vlaflow.sim.teleop.teleop` and
:func:`vlaflow.sim.evaluate.evaluate`; this module turns flags into their typed parameters and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlaflow.atomic import OVERWRITE_HELP, fresh_directory
from vlaflow.errors import VlaflowError
from vlaflow.sim.collect import collect
from vlaflow.sim.evaluate import DEFAULT_EPISODES, DEFAULT_START_SEED, OBS_MODE_CHOICES, evaluate
from vlaflow.sim.harness import format_summary
from vlaflow.sim.multitask import format_table
from vlaflow.sim.tasks import TASK_SETS, TASKS, WM_PREFIX, is_task_set
from vlaflow.sim.teleop import ARM_TASKS, InputSource, JoystickSource, KeyboardSource, ScriptedKeys, teleop

# ----------------------------------------------------------------------------- collect


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        required=True,
        help="task with a scripted expert (pick_place, pick_place_two, lift, can, mw:<name>) or a task set "
        "(mw:mt10, ...: every member into one store)",
    )
    p.add_argument(
        "--episodes", type=int, required=True, help="successful episodes to store (per task for a task set)"
    )
    p.add_argument("--out", required=True, help="episode store to create")
    p.add_argument("--obs-mode", choices=["lowdim", "image"], default="lowdim", help="observations to record")
    p.add_argument(
        "--seed", type=int, default=0, help="reset seed of the first attempt (attempt i uses seed+i)"
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="give up after this many episodes (default 2*episodes+10)",
    )
    p.add_argument("--image-size", type=int, default=None, help="camera image side in pixels (image mode)")
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="noise std on executed motion (DART); clean actions stored",
    )
    p.add_argument(
        "--paraphrase",
        action="store_true",
        help="store one of the task's instructions per episode (drawn by seed) instead of the canonical one",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--resume",
        "--append",
        dest="resume",
        action="store_true",
        help="continue the store at --out (same task, --seed, --noise, --paraphrase): its episodes are kept "
        "and the next seeds are tried until --episodes are stored; what a killed collect left is resumed so",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = (
        "--out is written as episodes finish (a kill keeps every finished one; --resume continues). An "
        "existing --out is refused unless --resume or --overwrite; --overwrite keeps the old store until the "
        "new one is complete."
    )


def run_collect(args: argparse.Namespace) -> int:
    kw = {}
    if args.image_size is not None:
        if args.obs_mode != "image":
            raise VlaflowError("--image-size only applies with --obs-mode image")
        kw["render_size"] = args.image_size
    res = collect(
        args.task,
        args.episodes,
        args.out,
        obs_mode=args.obs_mode,
        seed=args.seed,
        max_attempts=args.max_attempts,
        noise=args.noise,
        overwrite=args.overwrite,
        env_kwargs=kw,
        progress=not args.no_progress,
        paraphrase=args.paraphrase,
        resume=args.resume,
    )
    if len(res.per_task) > 1:
        for name, r in res.per_task.items():
            print(f"  {name}: {r['episodes']} episodes from {r['attempts']} attempts")
    if res.kept:
        print(f"collect {args.task}: {res.kept} episodes were already in {res.path}; continued from there")
    print(
        f"collect {args.task}: wrote {res.n_episodes - res.kept} episodes ({res.n_steps} steps) to "
        f"{res.path}; {res.n_episodes} from {res.n_attempts} attempts "
        f"({res.n_episodes / max(res.n_attempts, 1):.0%} success) "
        f"in {res.wall_s:.1f} s"
    )
    return 0


# ----------------------------------------------------------------------------- teleop


def add_teleop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help=f"arm task ({', '.join(ARM_TASKS)})")
    p.add_argument("--out", required=True, help="episode store to create or append to")
    p.add_argument("--obs-mode", choices=["lowdim", "image"], default="lowdim", help="observations to record")
    p.add_argument(
        "--seed", type=int, default=0, help="scene seed of the first episode (then +1 per episode)"
    )
    p.add_argument(
        "--input", choices=["keyboard", "joystick"], default="keyboard", help="input device (pygame window)"
    )
    p.add_argument(
        "--script", default=None, help="JSON list of [step, key] events: headless scripted session"
    )
    p.add_argument("--speed", type=float, default=1.0, help="fraction of the task's max end-effector step")
    p.add_argument("--no-auto-save", action="store_true", help="do not save and reset when the task succeeds")


def run_teleop(args: argparse.Namespace) -> int:
    if not 0 < args.speed <= 1:
        raise VlaflowError(f"--speed must be in (0, 1], got {args.speed}")
    if args.script:
        source: InputSource = ScriptedKeys.from_json(args.script)
        show = False
    else:
        source = (
            JoystickSource(10.0) if args.input == "joystick" else KeyboardSource(10.0)
        )  # re-paced per task
        show = True
    res = teleop(
        args.task,
        args.out,
        source,
        obs_mode=args.obs_mode,
        seed=args.seed,
        speed=args.speed,
        auto_save_on_success=not args.no_auto_save,
        show=show,
    )
    print(f"teleop {args.task}: saved {res.saved} episodes to {args.out}, discarded {res.discarded}")
    return 0


# ----------------------------------------------------------------------------- eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        default="pusht",
        help=f"task ({', '.join(t for t in TASKS if not t.startswith('mw:'))}, mw:<name>), task set "
        f"({', '.join(TASK_SETS)}) or wm:WM_CKPT (in imagination: the world model's task, real resets as "
        "starts)",
    )
    parser.add_argument("--policy", required=True, help="checkpoint directory, 'replay:STORE' or 'random'")
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help=f"episodes to run (default {DEFAULT_EPISODES}; a replay runs every stored episode)",
    )
    parser.add_argument(
        "--episodes-per-task",
        type=int,
        default=None,
        help=f"episodes per task of a task set, the same seeds for each (default {DEFAULT_EPISODES})",
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="tell a language-conditioned policy this instruction instead of each task's own",
    )
    parser.add_argument(
        "--allow-unseen-tasks",
        action="store_true",
        help="evaluate on tasks the policy was not trained on (refused otherwise); the report lists them",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_START_SEED, help="first episode seed (seed, seed+1, ...)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0 = run in this process)")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for report.json and videos/ (must not exist; never the policy's directory)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(
        "--videos",
        type=int,
        default=None,
        help="record mp4 videos of the first K episodes (of each task of a task set); default 2, 1 per task",
    )
    parser.add_argument("--obs-mode", default="auto", choices=OBS_MODE_CHOICES, help="observation variant")
    parser.add_argument("--max-steps", type=int, default=None, help="override the task's step limit")
    parser.add_argument("--device", default="cpu", help="torch device for checkpoint policies")
    parser.add_argument(
        "--wm-reward",
        default=None,
        choices=["coverage", "classifier"],
        help="--task wm:...: the imagined reward (default: the one the world-model checkpoint records)",
    )
    parser.add_argument(
        "--wm-range-margin",
        type=float,
        default=None,
        help="--task wm:...: an imagined state beyond the training data's range by this fraction of it ends "
        "the episode as invalid (default 0.1)",
    )
    parser.add_argument(
        "--record",
        default=None,
        metavar="STORE",
        help="append every evaluated episode to this episode store as it ends (observations, executed "
        "actions, success; source policy:eval:<policy>): data for filtered imitation, DAgger or RL-100's "
        "merge. A new store unless --record-append",
    )
    parser.add_argument(
        "--record-only-success", action="store_true", help="--record: keep the successful episodes only"
    )
    parser.add_argument(
        "--record-append",
        action="store_true",
        help="--record: append to an existing store of the same schema (e.g. a copy of the demonstrations)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    multi = is_task_set(args.task)
    n_episodes = args.episodes
    if args.episodes_per_task is not None:
        if args.episodes is not None and args.episodes != args.episodes_per_task:
            raise VlaflowError("give --episodes or --episodes-per-task, not both")
        n_episodes = args.episodes_per_task
    elif multi and args.episodes is not None:
        raise VlaflowError(f"{args.task} is a task set: give --episodes-per-task N (episodes for each task)")
    videos = args.videos if args.videos is not None else (1 if multi else 2)
    check_policy_arg(args.policy, args.device)
    _check_record_args(args)
    with fresh_directory(args.out, overwrite=args.overwrite, sources=_policy_sources(args.policy)) as out:
        report = _evaluate(args, out, n_episodes, videos)
    if multi:
        print(format_table(report))
    if report.get("unseen_tasks"):
        print(f"note: evaluated on tasks the policy was not trained on: {', '.join(report['unseen_tasks'])}")
    print(f"{format_summary(report)} -> {Path(args.out) / 'report.json'}")
    if report.get("recorded"):
        r = report["recorded"]
        left = f" ({r['left_out']} unsuccessful left out)" if r["only_success"] else ""
        print(f"recorded {len(r['seeds'])} episode(s) to {r['store']}{left}")
    if report["errors"]:
        for e in report["errors"]:
            first = e["error"].strip().splitlines()[0]
            print(f"  failed: seed {e['seed']}: {first}", file=sys.stderr)
        raise VlaflowError(f"{len(report['errors'])} episode(s) failed; see {Path(args.out) / 'report.json'}")
    return 0


def check_policy_arg(policy: str, device: str) -> None:
    """Say what a wrong --policy is and what to pass instead, before any env or worker starts."""
    hint = "pass a checkpoint directory (e.g. RUN/checkpoints/best), onnx:EXPORT_DIR, replay:STORE or random"
    if policy == "random":
        return
    for prefix, what in (("replay:", "episode store"), ("onnx:", "ONNX export directory")):
        if policy.startswith(prefix) and not Path(policy[len(prefix) :]).exists():
            raise VlaflowError(f"--policy {policy}: no such {what} {policy[len(prefix) :]}")
    if policy.startswith("onnx:"):
        if not (Path(policy[5:]) / "manifest.json").is_file():
            raise VlaflowError(
                f"--policy {policy}: {policy[5:]} is not an ONNX export (no manifest.json); "
                + (
                    "it is a checkpoint: pass it without onnx:"
                    if (Path(policy[5:]) / "config.json").is_file()
                    else hint
                )
            )
        return
    if policy.startswith("replay:"):
        return
    p = Path(policy)
    if not p.exists():
        raise VlaflowError(f"--policy {policy}: no such path; {hint}")
    if (p / "manifest.json").is_file():
        raise VlaflowError(
            f"--policy {policy} is an ONNX export (manifest.json); pass --policy onnx:{policy}"
        )
    if (p / "checkpoints").is_dir():
        found = sorted(
            str(c) for c in (p / "checkpoints").iterdir() if c.is_dir() and not c.name.startswith(".")
        )
        raise VlaflowError(
            f"--policy {policy} is a training run directory; pass one of its checkpoints: "
            + (", ".join(found) if found else "(it has none yet)")
        )
    if (p / "data").is_dir() and (p / "meta" / "episode_ends").exists():
        raise VlaflowError(
            f"--policy {policy} is an episode store; to replay it pass --policy replay:{policy}"
        )
    if device.startswith("cuda"):
        import torch  # only here: `vlaflow eval --help` and non-CUDA runs stay as they were

        if not torch.cuda.is_available():
            raise VlaflowError(f"--device {device!r} but CUDA is not available here; use --device cpu")


def _check_record_args(args: argparse.Namespace) -> None:
    """--record's store: not inside --out (an --overwrite would remove it), not the policy's own files, and
    only an existing one with --record-append -- all before any env or worker starts."""
    if args.record is None:
        if args.record_only_success or args.record_append:
            raise VlaflowError("--record-only-success / --record-append need --record STORE")
        return
    rec, out = Path(args.record).resolve(), Path(args.out).resolve()
    if rec == out or out in rec.parents or rec in out.parents:
        raise VlaflowError(f"--record {args.record} must lie outside --out {args.out} (and not contain it)")
    for label, src in _policy_sources(args.policy).items():
        s = Path(src).resolve()
        if rec == s or s in rec.parents:
            raise VlaflowError(f"--record {args.record} must not be inside {label}")
    if rec.exists() and not args.record_append:
        raise VlaflowError(
            f"--record {args.record} exists; pass --record-append to add episodes to it, or another path"
        )
    if args.record_append and rec.exists() and not (rec / "meta" / "episode_ends").exists():
        raise VlaflowError(f"--record-append: {args.record} is not an episode store")


def _policy_sources(policy: str) -> dict[str, str]:
    """What --out must not be, contain or lie inside: the policy's own files (checkpoint, export, store)."""
    for prefix in ("replay:", "onnx:"):
        if policy.startswith(prefix):
            return {f"--policy {policy}": policy[len(prefix) :]}
    return {f"--policy {policy}": policy}


def _imagined_kwargs(args: argparse.Namespace) -> dict:
    kw = {"reward": args.wm_reward, "range_margin": args.wm_range_margin}
    kw = {k: v for k, v in kw.items() if v is not None}
    if kw and not args.task.startswith(WM_PREFIX):
        raise VlaflowError(f"--wm-reward / --wm-range-margin are for --task wm:WM_CKPT, not {args.task!r}")
    return kw


def _evaluate(args: argparse.Namespace, out: Path, n_episodes: int | None, videos: int) -> dict:
    return evaluate(
        args.policy,
        task=args.task,
        workers=args.workers,
        out_dir=out,
        n_episodes=n_episodes,
        start_seed=args.seed,
        max_steps=args.max_steps,
        videos=videos,
        obs_mode=args.obs_mode,
        device=args.device,
        progress=not args.quiet,
        instruction=args.instruction,
        allow_unseen_tasks=args.allow_unseen_tasks,
        env_kwargs=_imagined_kwargs(args) or None,
        record=args.record,
        record_only_success=args.record_only_success,
        record_append=args.record_append,
    )
