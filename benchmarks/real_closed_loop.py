"""Closed loop through DDS: a pick_place policy drives the simulated arm process through the policy node
process over CycloneDDS (loopback), episode by episode, against ``vlaflow eval`` in-process on the same
seeds. Also the latency table's rows: end-to-end latency (observation capture stamp -> command written),
inference latency and the control tick's jitter, read from the node's diagnostics.

    python benchmarks/real_closed_loop.py --policy runs/pick_demo/run/checkpoints/last --episodes 30 \
        --label torch --out benchmarks/results
    python benchmarks/real_closed_loop.py --policy onnx:runs/pick_onnx --episodes 10 --label onnx \
        --skip-inprocess --out benchmarks/results

Writes ``real_closed_loop.json`` (one row per run, appended) and ``real_closed_loop.md`` (all rows).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _meta import append_rows, run_info  # noqa: E402
from _real import CLI, dds_env, start, stop, wait_file  # noqa: E402


def dds_episodes(args, workdir: Path) -> dict:
    from vlaflow.real.contract import load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.driver import EpisodeDriver

    env = dds_env(args.threads)
    domain = args.domain if args.domain is not None else random.randrange(100, 230)
    d = ["--domain", str(domain)]
    arm = start(
        [*CLI, "sim-arm", "--robot", args.robot, *d, "--command-log", str(workdir / "commands.jsonl")],
        env,
        workdir / "sim_arm.log",
    )
    summary = workdir / "node_summary.json"
    node_args = [
        *CLI,
        "node",
        "--policy",
        args.policy,
        "--robot",
        args.robot,
        *d,
        "--summary",
        str(summary),
        "--merge",
        args.merge,
        "--threads",
        str(args.threads),
    ]
    node = start(node_args, env, workdir / "node.log")
    contract = load_contract(args.robot)
    t = DdsTransport(domain)
    driver = EpisodeDriver(contract, t)
    results = []
    try:
        driver.status(60)
        time.sleep(args.warmup_s)  # the node loads its policy
        for i in range(args.episodes):
            seed = args.start_seed + i
            r = driver.episode(seed, args.max_steps)
            results.append(
                {"seed": r.seed, "success": r.success, "steps": r.steps, "wall_s": round(r.wall_s, 2)}
            )
            print(f"  DDS seed {seed}: {'success' if r.success else 'fail'} in {r.steps} steps", flush=True)
            time.sleep(0.3)
    finally:
        t.close()
        stop(node)
        stop(arm)
    node_sum = wait_file(summary, 30)
    return {"episodes": results, "node": node_sum, "domain": domain}


def inprocess(args, workdir: Path, latency: str | None) -> dict:
    from vlaflow.sim.evaluate import evaluate

    kw = {}
    if latency is not None:
        from vlaflow.deploy.executor import RealtimeConfig
        from vlaflow.sim.realtime import SimRealtimeConfig

        kw = {
            "executor": "realtime",
            "realtime": SimRealtimeConfig(RealtimeConfig(merge=args.merge), latency=latency),
        }
    seeds = list(range(args.start_seed, args.start_seed + args.episodes))
    rep = evaluate(
        args.policy,
        task="pick_place",
        seeds=seeds,
        workers=1,
        max_steps=args.max_steps,
        out_dir=workdir / f"eval_{latency or 'sync'}".replace(":", "_"),
        progress=False,
        **kw,
    )
    return {
        "episodes": [
            {"seed": e["seed"], "success": bool(e["success"]), "steps": e["length"]} for e in rep["episodes"]
        ]
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--robot", default="panda_pick_place")
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--start-seed", type=int, default=100000)
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--merge", default="switch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--domain", type=int, default=None)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--label", default="torch")
    p.add_argument("--skip-inprocess", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--workdir", default="runs/bench_real")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / f"closed_loop_{args.label}"
    work.mkdir(parents=True, exist_ok=True)
    info = run_info(("vlaflow", "numpy", "torch", "onnxruntime", "cyclonedds", "pybullet", "rosbags"))
    t0 = time.monotonic()
    dds = dds_episodes(args, work)
    row = {
        "label": args.label,
        "policy": args.policy,
        "robot": args.robot,
        "merge": args.merge,
        "threads": args.threads,
        "seeds": [args.start_seed, args.start_seed + args.episodes - 1],
        "dds_success_rate": sum(e["success"] for e in dds["episodes"]) / len(dds["episodes"]),
        "dds_episodes": dds["episodes"],
    }
    diag = dds["node"]["diagnostics"]
    lat = [
        r["executor"].get("latency_p50_s") for r in dds["node"]["runs"] if r["executor"].get("latency_p50_s")
    ]
    row["node"] = {
        k: diag.get(k)
        for k in (
            "e2e_latency_p50_s",
            "e2e_latency_p99_s",
            "command_age_p50_s",
            "command_age_p99_s",
            "tick_jitter_p50_s",
            "tick_jitter_p99_s",
            "tick_overruns",
            "underruns",
            "stale_frames",
            "deadline_misses",
            "safety_interventions",
            "rejected_messages",
        )
    }
    row["node"]["inference_latency_p50_s_median_over_runs"] = sorted(lat)[len(lat) // 2] if lat else None
    runs = dds["node"]["runs"]
    row["node"]["past_step_actions"] = sum(r["past_step_actions"] for r in runs)
    row["node"]["underruns"] = sum(r["executor"].get("underruns", 0) for r in runs)
    row["node"]["inference_deadline_misses"] = sum(r["executor"].get("deadline_misses", 0) for r in runs)
    row["node"]["ticks"] = sum(r["ticks"] for r in runs)
    row["node"]["chunk_rejects"] = sum(sum(r["chunk_rejects"].values()) for r in runs)
    if not args.skip_inprocess:
        for name, latency in (("sync", None), ("realtime_1step", "fixed:0.05")):
            ev = inprocess(args, work, latency)
            row[f"inprocess_{name}_success_rate"] = sum(e["success"] for e in ev["episodes"]) / len(
                ev["episodes"]
            )
            row[f"inprocess_{name}_episodes"] = ev["episodes"]
    row["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    row.update(info)
    out = Path(args.out)
    append_rows(out / "real_closed_loop.json", [row])
    write_markdown(out)
    print(json.dumps({k: v for k, v in row.items() if "episodes" not in k}, indent=1, default=str))
    return 0


def write_markdown(out: Path) -> None:
    rows = json.loads((out / "real_closed_loop.json").read_text())
    lines = [
        "# Closed loop through CycloneDDS (sim-arm process <-> node process, loopback)",
        "",
        "Generated by `benchmarks/real_closed_loop.py` (commands in each row of `real_closed_loop.json`).",
        "Success over the same seeds: through DDS on the wall clock, and in-process (`vlaflow eval`: the",
        "synchronous executor, and the real-time executor with a 50 ms inference delay, i.e. a chunk lands",
        "one tick after it starts, as through the node). Latencies from the node's diagnostics (seconds).",
        "",
        "| label | policy | seeds | DDS success | in-process sync | in-process 1-step delay | e2e p50 / p99 |"
        " command age p50 / p99 | inference p50 | tick jitter p50 / p99 | overruns | underruns | past-step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    for r in rows:
        n = r["node"]
        lines.append(
            f"| {r['label']} | `{r['policy']}` | {r['seeds'][0]}..{r['seeds'][1]} | "
            f"{r['dds_success_rate']:.2f} | {f(r.get('inprocess_sync_success_rate'), 2)} | "
            f"{f(r.get('inprocess_realtime_1step_success_rate'), 2)} | "
            f"{f(n['e2e_latency_p50_s'])} / {f(n['e2e_latency_p99_s'])} | "
            f"{f(n['command_age_p50_s'])} / {f(n['command_age_p99_s'])} | "
            f"{f(n['inference_latency_p50_s_median_over_runs'])} | "
            f"{f(n['tick_jitter_p50_s'], 4)} / {f(n['tick_jitter_p99_s'], 4)} | {n['tick_overruns']} | "
            f"{n['underruns']} | {n['past_step_actions']} |"
        )
    lines += ["", f"Machine: {rows[-1]['machine']}", f"Versions: {rows[-1]['versions']}", ""]
    (out / "real_closed_loop.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
