"""``vlaflow bench latency CKPT``: flags -> :class:`~vlaflow.deploy.bench.LatencyBench`, the closed-loop
PushT score wired in from :func:`vlaflow.sim.evaluate.evaluate`, then the table on stdout."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from typing import Any

from vlaflow.atomic import OVERWRITE_HELP, fresh_directory
from vlaflow.deploy.bench import SAMPLERS, LatencyBench, bench_latency, latency_markdown
from vlaflow.deploy.executor import RealtimeConfig
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.sim.evaluate import evaluate
from vlaflow.sim.realtime import SimRealtimeConfig


def pusht_score(
    factory: Callable[[], Any],
    episodes: int,
    workers: int,
    max_steps: int | None,
    merge: str | None = None,
    exec_horizon: int = 0,
) -> dict:
    """The bench's ``score``: mean score and success rate of ``factory`` on PushT seeds 100000..; with
    ``merge`` through the real-time executor on the sim clock (zero latency), replanning every
    ``exec_horizon`` control steps."""
    kw: dict[str, Any] = {}
    if merge:
        rt = RealtimeConfig(merge=merge, exec_horizon=exec_horizon)
        kw = {"executor": "realtime", "realtime": SimRealtimeConfig(rt)}
    rep = evaluate(
        factory, task="pusht", n_episodes=episodes, workers=workers, max_steps=max_steps, progress=False, **kw
    )
    if rep["errors"]:
        first = rep["errors"][0]["error"].strip().splitlines()[0]
        raise VlaflowError(f"{len(rep['errors'])} evaluation episode(s) failed: {first}")
    a = rep["aggregate"]
    return {"mean_score": a["mean_score"], "success_rate": a["success_rate"], "episodes": a["n_episodes"]}


def _parse_variants(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, steps = part.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"--variants entries are SAMPLER:STEPS (ddpm|ddim|euler|heun), got {part!r}")
        out.append((name, int(steps)))
    return tuple(out)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in text.split(",") if r.strip())


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = sub.add_parser(
        "latency", help="control-step latency + PushT score per variant, eager vs ONNX Runtime"
    )
    p.add_argument("checkpoint", help="policy checkpoint directory (PushT low-dim)")
    p.add_argument(
        "--onnx", default="", help="an existing `vlaflow export` of CKPT (default: export to a temp dir)"
    )
    p.add_argument("--variants", default="", help="SAMPLER:STEPS list (default ddpm:100,ddim:10 | euler:10)")
    p.add_argument(
        "--runtimes", default="torch-eager,onnxruntime", help="comma list of torch-eager, onnxruntime"
    )
    p.add_argument(
        "--rti", action="store_true", help="add RTI-DP rows (vlaflow.deploy.rti, eager and ONNX Runtime)"
    )
    p.add_argument(
        "--rti-warm",
        type=int,
        default=0,
        help="RTI reverse steps after the warm start (default: RTIConfig's, 20 on a 100-step grid; the "
        "paper's PushT setting is 3)",
    )
    p.add_argument(
        "--rti-exec-horizon",
        type=int,
        default=0,
        help="score RTI replanning every S control steps through the real-time executor (1: every tick, "
        "RTI-DP's own regime); default: plain chunking every Ta",
    )
    p.add_argument(
        "--onestep", default="", help="one-step consistency student checkpoint(s) to add (comma list)"
    )
    p.add_argument("--ebt", default="", help="an EBT checkpoint to add")
    p.add_argument("--episodes", type=int, default=50, help="PushT episodes per row for the score")
    p.add_argument("--no-score", action="store_true", help="latency only")
    p.add_argument(
        "--score-runtimes", default="torch-eager,onnxruntime", help="runtimes whose rows get a PushT score"
    )
    p.add_argument(
        "--score-only", default="", help="comma list of VARIANT/runtime rows to score (default all)"
    )
    p.add_argument(
        "--scores-from",
        default="",
        help="reuse the scores of earlier latency.json files (comma list; same variant and runtime)",
    )
    p.add_argument(
        "--eager-reports",
        default="",
        help="reuse eager scores from DIR/<sampler><steps>/report.json (an eval of CKPT, same episodes)",
    )
    p.add_argument("--workers", type=int, default=2, help="evaluation worker processes")
    p.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the task's)")
    p.add_argument("--repeats", type=int, default=50, help="timed control steps per row")
    p.add_argument("--step-repeats", type=int, default=300, help="timed single denoiser steps per runtime")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument(
        "--out",
        default="",
        help="directory for latency.json, latency.md, latency_hist.png (must not exist; never an input's)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench != "latency":
        raise ConfigError(f"unknown benchmark {args.bench!r}; known: latency")
    cfg = LatencyBench(
        checkpoint=args.checkpoint,
        onnx=args.onnx or None,
        variants=_parse_variants(args.variants),
        runtimes=_comma_list(args.runtimes),
        rti=args.rti or bool(args.rti_warm or args.rti_exec_horizon),
        rti_warm=args.rti_warm,
        rti_exec_horizon=args.rti_exec_horizon,
        onestep=tuple(c for c in args.onestep.split(",") if c),
        ebt=args.ebt or None,
        episodes=args.episodes,
        score_runtimes=_comma_list(args.score_runtimes),
        score_only=_comma_list(args.score_only),
        scores_from=tuple(filter(None, args.scores_from.split(","))),
        eager_reports=args.eager_reports or None,
        workers=args.workers,
        max_steps=args.max_steps,
        repeats=args.repeats,
        step_repeats=args.step_repeats,
        threads=args.threads,
        out=args.out or None,
    )
    inputs = {"the checkpoint": args.checkpoint, "--onnx": args.onnx or None, "--ebt": args.ebt or None}
    inputs.update({f"--scores-from {p}": p for p in cfg.scores_from})
    inputs.update({f"--onestep {p}": p for p in cfg.onestep})
    if args.eager_reports:
        inputs["--eager-reports"] = args.eager_reports
    with (
        fresh_directory(args.out, overwrite=args.overwrite, sources=inputs)
        if args.out
        else contextlib.nullcontext()
    ):
        result = bench_latency(cfg, score=None if args.no_score else pusht_score)
    print(latency_markdown(result))
    if args.json:
        keys = ("variant", "runtime", "nfe", "p50_ms", "p99_ms", "mean_score", "success_rate", "episodes")
        print(json.dumps([{k: r.get(k) for k in keys} for r in result["rows"]]))
    return 0
