"""The ``vlaflow`` command (layer 5: every argparse line lives in this package).

Sub-commands are listed once in :data:`COMMANDS` (name -> module, help). A command's module is imported
only when that command runs, so ``vlaflow --help`` and light commands never pay for torch or simulators.
Each module defines ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (dashes in the name
become underscores).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from vlaflow.errors import VlaflowError

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": (
        "vlaflow.cli.data",
        "import a dataset (diffusion_policy zarr, LeRobot, robosuite hdf5, rosbag2)",
    ),
    "info": (
        "vlaflow.cli.data",
        "show an episode store's schema, episodes, tasks and per-key statistics",
    ),
    "view": (
        "vlaflow.cli.view",
        "look at an episode: cameras, state/action curves (Rerun .rrd or mp4 + PNG)",
    ),
    "validate": (
        "vlaflow.cli.data",
        "read every chunk of an episode store (exit 1: unfinished tail, 2: damaged)",
    ),
    "repair": (
        "vlaflow.cli.data",
        "trim an unfinished tail left by a killed writer (backed up; refuses damage)",
    ),
    "export-lerobot": ("vlaflow.cli.data", "write an episode store as a LeRobot v3.0 dataset"),
    "collect": ("vlaflow.cli.sim", "record successful scripted-expert rollouts into an episode store"),
    "teleop": ("vlaflow.cli.sim", "drive a simulated task from the keyboard and record episodes"),
    "eval": ("vlaflow.cli.sim", "evaluate a policy by rollouts (parallel workers, report.json, videos)"),
    "train": ("vlaflow.cli.train", "train a policy on an episode store (a preset, or --family: own data)"),
    "demo": ("vlaflow.cli.train", "the full demo: collect demos, train a policy, evaluate it"),
    "compose": (
        "vlaflow.cli.compose",
        "compose pretrained denoising policies (GPC) and search weights",
    ),
    "refine": (
        "vlaflow.cli.refine",
        "RL refinement of a policy checkpoint: DPPO over the denoising chain, DSRL noise steering, the "
        "RL-100 offline loop (rl100), PPO inside a world model (world4rl)",
    ),
    "train-wm": (
        "vlaflow.cli.train_wm",
        "train a diffusion world model (EDM, two-hot actions) on an episode store",
    ),
    "imagine": (
        "vlaflow.cli.imagine",
        "a policy's imagined episode (world model) beside its real one: mp4 + error-vs-horizon plot",
    ),
    "distill": ("vlaflow.cli.distill", "distill a one-step consistency head from a teacher checkpoint"),
    "export": (
        "vlaflow.cli.export",
        "export a policy to ONNX (encoder + per-step denoiser) with parity report",
    ),
    "import-lerobot": (
        "vlaflow.cli.lerobot",
        "convert a LeRobot diffusion policy directory (safetensors + JSON) into a vlaflow checkpoint",
    ),
    "bench": ("vlaflow.cli.bench", "benchmarks: 'vlaflow bench latency CKPT' (p50/p99, NFE, score)"),
    "sim-arm": (
        "vlaflow.cli.real",
        "the pybullet pick_place arm behind ROS 2 topics (CycloneDDS), wall clock",
    ),
    "node": ("vlaflow.cli.real", "run a policy on a robot over ROS 2 topics (enable / e-stop, safety layer)"),
    "enable": ("vlaflow.cli.real", "engage / disengage / e-stop a running node (its latched topics)"),
    "record": ("vlaflow.cli.real", "record teleop episodes from ROS 2 topics into an episode store (+ MCAP)"),
    "serve": ("vlaflow.cli.real", "serve a policy over websocket + msgpack (openpi-client compatible)"),
}


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return a, argv[i + 1 :]
    return None, argv


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where the help does not already say its default and X means something
    (not None, "", False of a flag): argparse's own formatter printed "(default 50) (default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text.lower() or d is None or d is argparse.SUPPRESS or d == "" or d is False:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    lines = "\n".join(f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="vlaflow",
        description="vlaflow: generative visuomotor and vision-language-action policies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="vlaflow [-h] [--version] COMMAND [ARGS ...]",
        epilog=f"commands:\n{lines}\n\nRun 'vlaflow COMMAND --help' for a command's options.",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = _split_command(argv)
    top = _top_parser()
    top.add_argument("--version", action="store_true", help="print the version and exit")
    if name is None:
        ns = top.parse_args(argv)
        if ns.version:
            from vlaflow import __version__

            print(__version__)
            return 0
        top.print_help()
        return 2
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"vlaflow: unknown command '{name}'.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        return _missing_torch(name, e)
    fn = name.replace("-", "_")
    parser = argparse.ArgumentParser(
        prog=f"vlaflow {name}", description=help_text, formatter_class=_DefaultsFormatter
    )
    getattr(module, f"add_{fn}_arguments")(parser)
    args = parser.parse_args(rest)
    ok = False
    try:
        rc = int(getattr(module, f"run_{fn}")(args) or 0)
        ok = rc == 0
        return rc
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("vlaflow: interrupted", file=sys.stderr)
        return 130
    except VlaflowError as e:
        print(f"vlaflow {name}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        return _missing_torch(name, e)
    finally:
        if "torch.distributed" in sys.modules:  # a rank under torchrun: leave its group cleanly
            from vlaflow.train.process import end_process

            end_process(barrier=ok)


def _missing_torch(name: str, e: ModuleNotFoundError) -> int:
    """A torch-free install (``vlaflow[robot]``) asked for something that needs torch: say what to do."""
    if (e.name or "").split(".")[0] != "torch":
        raise e
    print(
        f"vlaflow {name}: error: this needs torch, which is not installed (a robot install, vlaflow[robot], "
        "runs node / serve / record with an ONNX export: --policy onnx:DIR). Install it with "
        "`pip install 'vlaflow[train]'` (on a CPU machine `pip install torch==2.13.0` first)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
