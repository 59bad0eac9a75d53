"""Simulation benchmarks: env steps/s per task (low-dim and with cameras), the wall time of a 50-episode PushT
evaluation with 2 workers, and the PushT replay check (issue 3's acceptance: >= 95% of the 206 human episodes
within 1 px, score >= 0.94).

    python benchmarks/sim_steps.py                          # pusht steps, 50-episode eval, replay check
    python benchmarks/sim_steps.py --tasks lift can --only steps   # other tasks' env rates (merged in)
    python benchmarks/sim_steps.py --tasks mw:reach mw:drawer-open mw:pick-place --only steps --seconds 3
        # Meta-World rows: the 39-d state, and one 84x84 corner camera

Results are merged into benchmarks/results/sim_steps.json (one entry per benchmark, each with the command,
machine and versions of the run that measured it) and rendered to sim_steps.md. The machine is shared: each
rate is the best of ``--repeats`` runs, and the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PUSHT_ZARR = REPO.parent / "shared" / "data" / "pusht_cchi_v7" / "pusht_cchi_v7_replay.zarr"
PACKAGES = ("vlaflow", "numpy", "gymnasium", "gym-pusht", "pymunk", "pygame", "av", "torch")
os.environ.setdefault("MUJOCO_GL", "egl")
NOTE_96 = (
    "drift is the block position (state[2:4]) after action t vs the recorded state t+1. The data README's "
    "'about 96%' is consistent with a keypoint-based drift instead: in 9 of the 206 episodes some recorded "
    "keypoints are > 1 px off the rigid-body keypoints of the recorded state itself, so at most 197/206 "
    "= 95.6% could pass such a test."
)


def env_rate(task: str, obs_mode: str, seconds: float, repeats: int) -> dict:
    """Random in-bounds actions, resetting at each episode end; best and all steps/s over ``repeats``."""
    from vlaflow.sim.tasks import make_env

    env = make_env(task, obs_mode=obs_mode)
    spec = env.task_spec
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    rng = np.random.default_rng(0)
    rates = []
    for r in range(repeats):
        env.reset(seed=r)
        n, t_ep, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, _, terminated, truncated, _ = env.step(rng.uniform(low, high))
            n, t_ep = n + 1, t_ep + 1
            if terminated or truncated or t_ep >= spec.max_steps:
                env.reset(seed=r * 1000 + n)
                t_ep = 0
        rates.append(n / (time.perf_counter() - t0))
    env.close()
    return {
        "steps_per_s": round(max(rates), 1),
        "steps_per_s_all": [round(x, 1) for x in rates],
        "obs_keys": {k: list(v) for k, v in spec.obs_shapes.items()},
        "fps": spec.fps,
    }


def eval_wall(workers: int, repeats: int) -> dict:
    from vlaflow.sim.evaluate import evaluate

    walls, report = [], None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            report = evaluate("random", task="pusht", workers=workers, out_dir=d, progress=False)
        walls.append(report["aggregate"]["wall_s"])
    agg = report["aggregate"]
    return {
        "policy": "random (uniform targets in [0, 512]^2, H=Ta=8; the timing is dominated by the simulator)",
        "episodes": agg["n_episodes"],
        "seeds": "100000..100049",
        "max_steps": 300,
        "workers": workers,
        "env_steps": int(sum(e["length"] for e in report["episodes"])),
        "wall_s": round(min(walls), 2),
        "wall_s_all": [round(w, 2) for w in walls],
        "random_policy_score": round(agg["mean_score"], 4),
        "random_policy_success_rate": agg["success_rate"],
    }


def replay_check(store: Path, workers: int) -> dict:
    from vlaflow.sim.evaluate import evaluate

    report = evaluate(f"replay:{store}", task="pusht", workers=workers, out_dir=None, progress=True)
    agg = report["aggregate"]
    (RESULTS / "pusht_replay_report.json").write_text(json.dumps(report, indent=1) + "\n")
    drifts = np.array([e["max_drift_px"] for e in report["episodes"]])
    return {
        "store": os.path.relpath(store, REPO),
        "episodes": agg["n_episodes"],
        "replay_within_1px": agg["replay_within_1px"],
        "max_drift_px_p50_p99_max": [float(f"{np.percentile(drifts, p):.3g}") for p in (50, 99, 100)],
        "score": round(agg["mean_score"], 4),
        "success_rate": round(agg["success_rate"], 4),
        "wall_s": round(agg["wall_s"], 2),
        "workers": workers,
        "accept": {"replay_within_1px": ">= 0.95", "score": ">= 0.94"},
        "pass": bool(agg["replay_within_1px"] >= 0.95 and agg["mean_score"] >= 0.94),
        "report": "benchmarks/results/pusht_replay_report.json",
        "note": NOTE_96,
    }


def render_md(results: dict) -> str:
    lines = ["# Simulation benchmarks", ""]
    lines += [
        "Written by `benchmarks/sim_steps.py`. Each entry's run info (command, machine, versions, load)"
    ]
    lines += [
        "is in `sim_steps.json`. 2 CPU cores shared with other jobs: rates are the best of the repeats.",
        "",
    ]
    lines += [
        "## Env steps/s (single process, random actions)",
        "",
        "| task | obs | steps/s | all runs |",
        "|---|---|---|---|",
    ]
    for name, r in sorted(results.items()):
        if name.startswith("steps/"):
            _, task, mode = name.split("/")
            lines.append(f"| {task} | {mode} | {r['steps_per_s']:,.0f} | {r['steps_per_s_all']} |")
    if "eval/pusht_50x2" in results:
        r = results["eval/pusht_50x2"]
        lines += ["", "## 50-episode PushT evaluation, 2 workers", ""]
        lines += [f"- wall time: **{r['wall_s']} s** (runs: {r['wall_s_all']}), {r['env_steps']:,} env steps"]
        lines += [
            f"- policy: {r['policy']}; its score {r['random_policy_score']} "
            f"(success {r['random_policy_success_rate']})"
        ]
    if "replay/pusht_human" in results:
        r = results["replay/pusht_human"]
        lines += ["", "## PushT replay check (206 human episodes, open loop from recorded start states)", ""]
        lines += [f"- within 1 px: **{100 * r['replay_within_1px']:.1f}%** (accept >= 95%)"]
        lines += [
            f"- score: **{r['score']}** (accept >= 0.94; data ceiling 0.946), success {r['success_rate']}"
        ]
        lines += [f"- max block drift per episode p50 / p99 / max: {r['max_drift_px_p50_p99_max']} px"]
        lines += [f"- note: {r.get('note', NOTE_96)}"]
        lines += [
            f"- pass: {r['pass']}; wall {r['wall_s']} s with {r['workers']} workers; "
            f"per episode: {r['report']}"
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["pusht"], help="tasks for the steps/s benchmark")
    p.add_argument("--modes", nargs="+", default=["lowdim", "image"], help="observation modes")
    p.add_argument(
        "--only", nargs="+", choices=["steps", "eval", "replay"], default=["steps", "eval", "replay"]
    )
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per steps/s run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--store", type=Path, default=PUSHT_ZARR, help="PushT human store for the replay check")
    args = p.parse_args()

    path = RESULTS / "sim_steps.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    info = run_info(PACKAGES)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "steps" in args.only:
        for task in args.tasks:
            for mode in args.modes:
                r = env_rate(task, mode, args.seconds, args.repeats)
                results[f"steps/{task}/{mode}"] = {**r, "run": info}
                print(
                    f"{task} {mode}: {r['steps_per_s']:,.0f} steps/s (all {r['steps_per_s_all']})", flush=True
                )
    if "eval" in args.only:
        r = eval_wall(2, args.eval_repeats)
        results["eval/pusht_50x2"] = {**r, "run": info}
        print(f"pusht 50-episode eval, 2 workers: {r['wall_s']} s (all {r['wall_s_all']})", flush=True)
    if "replay" in args.only:
        if not args.store.exists():
            sys.exit(f"replay check: store not found at {args.store}")
        r = replay_check(args.store, workers=2)
        results["replay/pusht_human"] = {**r, "run": info}
        print(
            f"replay: within 1 px {r['replay_within_1px']:.3f}, score {r['score']}, pass {r['pass']}",
            flush=True,
        )
    path.write_text(json.dumps({"results": results}, indent=2) + "\n")
    (RESULTS / "sim_steps.md").write_text(render_md(results))
    print(f"wrote {path} and sim_steps.md")


if __name__ == "__main__":
    main()
