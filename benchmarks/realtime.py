"""Real-time inference benchmark on PushT: RTI-DP, RTC, the one-step head and the executor under delay.

    nice -n 15 python benchmarks/realtime.py --ckpt /work/benchruns/diffusion/checkpoints/last \\
        --data STORE --variants contraction,rti,switch@0.1,rtc@0.1,rti@0.1 --episodes 50 --workers 2

Every variant is a closed-loop evaluation on the paper's seeds (100000..) through the sim harness with the
``realtime`` executor (:mod:`vlaflow.sim.realtime`: the deploy executor core on the sim clock), so latency
is simulated and the result is deterministic per seed. The executor statistics of each row are read from
the evaluation's report (``aggregate["executor"]``; per episode in ``episodes[i]["executor"]``).
Variants (``NAME`` or ``NAME@LATENCY_S``):

- ``sync``: the checkpoint's own sampler (or ``--sampler``/``--steps``), plain switching, zero latency
- ``switch@L``: the same with a simulated latency L (naive chunk switching)
- ``rti`` / ``rti@L``: RTI-DP warm start (``--rti-grid`` sampler:steps, ``--rti-warm`` tail steps)
- ``rtc@L``: RTC guidance (``--beta``), delay estimated online from the simulated latency
- ``ensemble@L``: temporal ensembling
- ``student``: a one-step consistency checkpoint (``--student``), zero latency
- ``contraction``: the contraction ratio of RTI's few-step map for several t0 (no rollouts)

Rows (one per variant) are merged into ``benchmarks/results/realtime.json`` (read-modify-write, keyed by
checkpoint + variant) together with the run info; ``realtime.md`` is regenerated from the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "realtime.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="policy checkpoint (diffusion or flow)")
    p.add_argument("--student", default="", help="one-step student checkpoint for the 'student' variant")
    p.add_argument("--data", default="", help="PushT store (observations for the contraction measurement)")
    p.add_argument("--variants", default="contraction,rti,switch@0.1,rtc@0.1,rti@0.1")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sampler", default="", help="sampler for sync/switch/rtc/ensemble (default: ckpt's)")
    p.add_argument("--steps", type=int, default=0, help="its steps (default: ckpt's)")
    p.add_argument("--rti-grid", default="", help="RTI grid sampler:steps (default ddpm:100 / euler:10)")
    p.add_argument(
        "--rti-warm", type=int, default=0, help="RTI tail steps after the warm start (default: RTIConfig's)"
    )
    p.add_argument(
        "--exec-horizon",
        type=int,
        default=0,
        help="control steps between inference starts (0: the policy's Ta; 1: replan every tick, RTI-DP's "
        "own regime, shift 1)",
    )
    p.add_argument("--beta", type=float, default=5.0, help="RTC guidance clip")
    p.add_argument(
        "--contraction-warm", default="3,5,10,20,30", help="warm-step counts of the contraction table"
    )
    p.add_argument(
        "--contraction-scale",
        type=float,
        default=0.5,
        help="std of the warm-start perturbations (normalized units; the shifted chunk's padded tail is "
        "off by ~0.3-0.5; the default matches rti.choose_warm_steps)",
    )
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "realtime"), help="eval reports (with executor stats)"
    )
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tag", default="", help="label stored with the rows (e.g. the checkpoint's name)")
    return p.parse_args(argv)


def _grid(args, family: str) -> tuple[str, int]:
    if args.rti_grid:
        s, n = args.rti_grid.split(":")
        return s, int(n)
    return ("ddpm", 100) if family == "diffusion" else ("euler", 10)


def contraction(args, family: str) -> dict:
    import torch

    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler
    from vlaflow.deploy.rti import RTIConfig, measure_contraction
    from vlaflow.policies.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    pol = load_checkpoint(args.ckpt)
    sampler, n = _grid(args, family)
    ws = WindowSampler(EpisodeStore.open(args.data), list(pol.config.obs_shapes), pol.config.n_obs_steps, 16)
    idx = np.random.default_rng(0).integers(0, len(ws), size=4)
    batch = ws.get_batch(idx)
    table = {}
    scale = args.contraction_scale
    for warm in [int(w) for w in args.contraction_warm.split(",") if w]:
        ratios = []
        for i in range(len(idx)):
            obs = {k: torch.from_numpy(batch[k][i : i + 1]) for k in pol.config.obs_shapes}
            with torch.no_grad():
                cond = pol.encode(obs)
                anchor = pol.denoise(cond, sampler="ddim", num_steps=10).x0
            cfg = RTIConfig(sampler=sampler, num_steps=n, n_warm_steps=warm)
            ratios.append(measure_contraction(pol, cond, anchor, cfg, n_pairs=8, scale=scale)["mean"])
        table[warm] = {"mean": float(np.mean(ratios)), "per_obs": [round(r, 4) for r in ratios]}
        print(f"contraction {sampler}:{n} warm={warm}: {table[warm]['mean']:.4f}", flush=True)
    grid = f"{sampler}:{n}"
    return {
        "grid": grid,
        "perturbation_scale": scale,
        "table": table,
        "runtime_kwargs": {"grid": grid, "scale": scale},
    }


def evaluate_variant(args, name: str, family: str) -> dict:
    from vlaflow.deploy.executor import RealtimeConfig
    from vlaflow.deploy.rti import RTIConfig
    from vlaflow.sim.evaluate import evaluate
    from vlaflow.sim.realtime import SimRealtimeConfig, make_realtime_policy

    base, _, lat = name.partition("@")
    latency = f"fixed:{lat or 0}"
    ckpt = args.student if base == "student" else args.ckpt
    rk: dict = {}
    merge = {"sync": "switch", "student": "switch"}.get(base, base)
    if merge in ("switch", "ensemble") and base != "student":
        rk = {k: v for k, v in (("sampler", args.sampler), ("num_steps", args.steps)) if v}
    elif merge == "rti":
        s, n = _grid(args, family)
        rk = {
            "sampler": s,
            "num_steps": n,
            "n_warm_steps": RTIConfig(sampler=s, num_steps=n, n_warm_steps=args.rti_warm).n_warm_steps,
        }
    elif merge == "rtc":
        rk = {"beta": args.beta, **({"sampler": args.sampler} if args.sampler else {})}
        rk.update({"num_steps": args.steps} if args.steps else {})
    factory = functools.partial(make_realtime_policy, str(ckpt), merge=merge, runtime_kwargs=rk)
    t0 = time.perf_counter()
    rep = evaluate(
        factory,
        task="pusht",
        n_episodes=args.episodes,
        workers=args.workers,
        executor="realtime",
        realtime=SimRealtimeConfig(
            RealtimeConfig(merge=merge, exec_horizon=args.exec_horizon), latency=latency
        ),
        out_dir=Path(args.out) / f"{Path(ckpt).parent.parent.name}_{name}_s{args.exec_horizon}",
        progress=True,
    )
    agg = rep["aggregate"]
    ex = agg.get("executor", {})  # the episodes' executor statistics, summed / averaged (report.json)
    row = {
        "variant": name,
        "merge": merge,
        "latency_s": float(lat or 0),
        "runtime_kwargs": rk,
        "exec_horizon": args.exec_horizon,  # 0: the policy's Ta
        "checkpoint": str(ckpt),
        "mean_score": agg["mean_score"],
        "success_rate": agg["success_rate"],
        "n_episodes": agg["n_episodes"],
        "n_errors": agg["n_errors"],
        "nfe_per_control_step": ex.get("nfe_per_control_step"),
        "nfe_per_inference_after_first": ex.get("nfe_after_first_max"),
        "nfe_first_inference": ex.get("nfe_first"),
        "boundary_jerk": ex.get("boundary_jerk"),
        "boundary_jump": ex.get("boundary_jump"),
        "interior_jerk": ex.get("interior_jerk"),
        "mean_jerk": ex.get("mean_jerk"),
        "underruns": ex.get("underruns", 0),
        "deadline_misses": ex.get("deadline_misses", 0),
        "stale_dropped": ex.get("stale_dropped", 0),
        "inferences": ex.get("inferences", 0),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def write_results(path: Path, rows: list[dict], info: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}

    def key(x: dict) -> tuple:  # one row per variant, checkpoint and runtime settings (e.g. RTI's grid)
        rk = json.dumps(x.get("runtime_kwargs") or {}, sort_keys=True)
        return x["variant"], x["checkpoint"], rk, x.get("exec_horizon", 0), x.get("n_episodes")

    for r in rows:
        r["run"] = info
        data["runs"] = [x for x in data["runs"] if key(x) != key(r)]
        data["runs"].append(r)
    path.write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(path.with_suffix(".md"), data)


def _variant_label(r: dict) -> str:
    rk = r.get("runtime_kwargs") or {}
    s = r.get("exec_horizon", 0)
    every = "" if not s else (", every tick" if s == 1 else f", every {s} steps")
    if r.get("merge") == "rti" and rk:
        return f"{r['variant']} ({rk['sampler']}:{rk['num_steps']}, {rk['n_warm_steps']} warm{every})"
    if every:
        return f"{r['variant']} ({every[2:]})"
    if r.get("merge") == "rtc" and "beta" in rk:
        return f"{r['variant']} (beta {rk['beta']:g})"
    if r.get("variant") == "student":
        return f"student `{Path(r['checkpoint']).name}`"
    if r.get("merge") in ("switch", "ensemble") and rk.get("sampler"):
        return f"{r['variant']} ({rk['sampler']}:{rk.get('num_steps', '')}{every})"
    return r["variant"]


def write_markdown(path: Path, data: dict) -> None:
    lines = [
        "# Real-time inference on PushT (RTI-DP, RTC, one-step head, executor under delay)",
        "",
        "Written by `benchmarks/realtime.py`; command, machine and versions of each row are in "
        "`realtime.json`. 50 episodes on seeds 100000.. unless stated, scored as mean max coverage. "
        "Latency is simulated on the sim clock (10 Hz control). Jerk: action units (px) per step^3.",
        "",
        "| checkpoint | variant | episodes | score | success | NFE/inference (after 1st) | "
        "NFE/control step | boundary jerk | interior jerk | boundary jump | underruns | stale dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("runs", []):
        if r.get("variant") == "contraction":
            continue
        f = lambda v, p=3: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(
            f"| {r.get('tag') or Path(r['checkpoint']).parent.parent.name} | {_variant_label(r)} | "
            f"{r['n_episodes']} | "
            f"{f(r['mean_score'])} | {f(r['success_rate'], 2)} | {f(r['nfe_per_inference_after_first'])} | "
            f"{f(r['nfe_per_control_step'], 2)} | {f(r['boundary_jerk'], 2)} | "
            f"{f(r.get('interior_jerk'), 2)} | {f(r['boundary_jump'], 2)} | "
            f"{r['underruns']} | {r['stale_dropped']} |"
        )
    for r in data.get("runs", []):
        if r.get("variant") == "contraction":
            lines += [
                "",
                f"## RTI few-step map contraction ({r.get('tag') or r['checkpoint']}, grid {r['grid']}, "
                f"perturbation std {r.get('perturbation_scale', 0.1)})",
                "",
            ]
            lines += ["| warm steps | mean ‖f(a) - f(b)‖ / ‖a - b‖ |", "|---|---|"]
            lines += [f"| {k} | {v['mean']:.4f} |" for k, v in r["table"].items()]
    lines += ["", *data.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    from benchmarks._meta import run_info
    from vlaflow.policies.checkpoint import read_checkpoint_meta

    args = parse_args(argv)
    info = run_info(("vlaflow", "numpy", "torch", "gym-pusht"))
    family = read_checkpoint_meta(args.ckpt)["config"]["family"]
    for name in [v for v in args.variants.split(",") if v]:
        if name == "contraction":
            row = {"variant": "contraction", "checkpoint": args.ckpt, **contraction(args, family)}
        else:
            row = evaluate_variant(args, name, family)
        if args.tag:
            row["tag"] = args.tag
        write_results(Path(args.results), [row], info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
