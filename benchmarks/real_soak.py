"""Soak of the node over CycloneDDS: 10 minutes at 30 Hz with injected faults, then e-stop trials.

    python benchmarks/real_soak.py --minutes 10 --estop-trials 20 --out benchmarks/results

Setup: the simulated Panda (``vlaflow sim-arm``, joint-trajectory contract ``panda_joints`` run at 30 Hz)
with 5 % of its sensor messages dropped and up to 20 ms of uniform jitter on the rest; the policy node
(this script's ``node`` role: a smooth joint-space policy circling joints 1-2, H = 16, Ta = 8) whose every
inference takes an extra lognormal latency (median 30 ms, sigma 0.6: p99 ~ 3.3 x the mean). Checked on the
arm's side from its command log: no command below / above the position limits, no per-tick velocity or
acceleration beyond the contract's limits, stamps strictly increasing (no action for a past step after a
later one); on the node's side: actions written after their tick's slot (past-step actions), control
ticks that started more than one period late (deadline misses of the loop), inference deadline misses
(landing after s * dt; caused by the injected latency). E-stop trials: a fresh node each, running 2 s,
then the e-stop; commands the arm receives after the e-stop was sent must be at most the one tick in
flight, within one period.

Writes ``real_soak.json`` and ``real_soak.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RATE = 30.0
HOME = np.array([0.0, -0.35, 0.0, -2.4, 0.0, 2.05, 0.785, 0.04])


def soak_contract(workdir: Path) -> Path:
    import yaml

    from vlaflow.real.contract import ROBOTS_DIR

    d = yaml.safe_load((ROBOTS_DIR / "panda_joints.yaml").read_text())
    d["name"] = "panda_joints_30hz"
    d["control"]["rate_hz"] = RATE
    p = workdir / "panda_joints_30hz.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


class CircleRuntime:
    """Joints 1 and 2 circle the home pose (radius 0.15 rad, 0.5 rad/s), the rest drift home: smooth."""

    def __init__(self, latency: str, seed: int = 0):
        from vlaflow.interfaces import RuntimeSpec
        from vlaflow.sim.realtime import parse_latency

        self.config = RuntimeSpec(2, 16, 8, {"obs.state": (9,)}, action_dim=8, fps=RATE)
        self.lat = parse_latency(latency)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed=None):
        pass

    def infer(self, obs, *, shift=None, delay=None):
        from vlaflow.interfaces import InferResult
        from vlaflow.sim.realtime import draw_latency

        t_end = time.monotonic() + draw_latency(*self.lat, self.rng)
        q = np.asarray(obs["obs.state"][-1], dtype=np.float64)[:8]
        out, p = [], q.copy()
        for _ in range(16):  # gentle enough from rest: |dv| per tick <= 0.15 rad/s (4.5 rad/s^2 < 7.5)
            r = p[:2] - HOME[:2]
            n = np.linalg.norm(r)
            radial = r / n if n > 1e-3 else np.array([1.0, 0.0])
            v = 0.5 * np.array([-r[1], r[0]]) + np.clip(1.0 * (0.15 - n), -0.15, 0.15) * radial
            p = p.copy()
            p[:2] += v / RATE
            p[2:] += np.clip(0.01 * (HOME[2:] - p[2:]), -0.003, 0.003)
            out.append(p)
        time.sleep(max(0.0, t_end - time.monotonic()))
        return InferResult(np.stack(out).astype(np.float32), nfe=0)


def node_role(domain: int, contract: str, seconds: float, summary: str, latency: str) -> None:
    from vlaflow.real.contract import load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.node import NodeConfig, PolicyNode

    t = DdsTransport(domain)
    node = PolicyNode(load_contract(contract), CircleRuntime(latency), t, NodeConfig(diagnostics_hz=1.0))
    stop = threading.Event()
    try:
        node.spin(stop, seconds)
    finally:
        Path(summary).write_text(
            json.dumps(
                {"runs": node.runs, "diagnostics": node.diagnostics(), "ticks": node.ticks}, default=float
            )
        )
        t.close()


def check_commands(rows: list[dict], contract) -> dict:
    """Limits, velocity, acceleration and stamp order of what reached the arm."""
    a = contract.action
    low, high = np.asarray(a.low), np.asarray(a.high)
    vmax, amax = np.asarray(a.max_velocity), np.asarray(a.max_acceleration)
    dt = 1.0 / RATE
    q = np.array([r["data"] for r in rows])
    st = np.array([r["stamp_ns"] for r in rows], dtype=np.int64)
    eps = 1e-6
    out = {"commands": len(rows)}
    out["position_violations"] = int(((q < low - eps) | (q > high + eps)).any(axis=1).sum())
    gaps = np.diff(st) / 1e9
    steps = np.round(gaps / dt).astype(int)
    out["stamps_not_increasing"] = int((np.diff(st) <= 0).sum())
    contiguous = steps == 1  # velocity / acceleration between consecutive ticks (a dropped command skips)
    v = np.diff(q, axis=0) / dt
    out["velocity_violations"] = int(
        ((np.abs(v) > vmax * (1 + 1e-6) + eps) & contiguous[:, None]).any(axis=1).sum()
    )
    acc_ok = contiguous[1:] & contiguous[:-1]
    acc = np.diff(v, axis=0) / dt
    out["acceleration_violations"] = int(
        ((np.abs(acc) > amax * (1 + 1e-6) + 1e-3) & acc_ok[:, None]).any(axis=1).sum()
    )
    lag = (np.array([r["recv_ns"] for r in rows]) - st) / 1e9
    from _real import percentiles

    out["stamp_to_arm_s"] = percentiles(lag, (50, 99, 100))
    out["max_abs_velocity"] = (
        np.abs(v[contiguous]).max(axis=0).round(4).tolist() if contiguous.any() else None
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--estop-trials", type=int, default=20)
    p.add_argument("--latency", default="lognormal:0.03:0.6")
    p.add_argument("--drop", type=float, default=0.05)
    p.add_argument("--jitter", type=float, default=0.02)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--workdir", default="runs/bench_real/soak")
    p.add_argument("role", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role and args.role[0] == "node":
        _, domain, contract, seconds, summary = args.role
        node_role(int(domain), contract, float(seconds), summary, args.latency)
        return 0

    from _meta import run_info
    from _real import CLI, dds_env, percentiles, start, stop, wait_file

    from vlaflow.real import msgs
    from vlaflow.real.contract import load_contract
    from vlaflow.real.dds import DdsTransport
    from vlaflow.real.driver import EpisodeDriver

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cpath = soak_contract(work)
    contract = load_contract(cpath)
    env = dds_env(1)
    domain = random.randrange(100, 230)
    info = run_info(("vlaflow", "numpy", "cyclonedds", "pybullet"))
    log = work / "commands.jsonl"
    log.unlink(missing_ok=True)
    arm = start(
        [
            *CLI,
            "sim-arm",
            "--robot",
            str(cpath),
            "--domain",
            str(domain),
            "--drop",
            str(args.drop),
            "--jitter",
            str(args.jitter),
            "--command-log",
            str(log),
        ],
        env,
        work / "sim_arm.log",
    )
    me = [sys.executable, __file__, "--latency", args.latency]
    t = DdsTransport(domain)
    driver = EpisodeDriver(contract, t)
    received: list[int] = []
    t.subscribe(
        contract.command.topic,
        contract.command.type,
        contract.command.qos,
        lambda r: received.append(r.recv_ns),
    )
    row: dict = {
        "rate_hz": RATE,
        "minutes": args.minutes,
        "inference_latency": args.latency,
        "sensor_drop": args.drop,
        "sensor_jitter_s": args.jitter,
    }
    try:
        driver.status(60)
        # ---------------------------------------------------------------- soak
        seconds = args.minutes * 60
        summary = work / "soak_node.json"
        summary.unlink(missing_ok=True)
        node = start(
            [*me, "node", str(domain), str(cpath), str(seconds + 8), str(summary)], env, work / "node.log"
        )
        time.sleep(6)
        driver.enable(True)
        t_on = time.time_ns()
        time.sleep(seconds)
        driver.enable(False)
        t_off = time.time_ns()
        stop(node, 60)
        s = wait_file(summary, 60)
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if t_on <= r["recv_ns"] <= t_off and r["stamp_ns"]]
        row["arm_side"] = check_commands(rows, contract)
        runs = s["runs"]
        ticks = sum(r["ticks"] for r in runs)
        row["node_side"] = {
            "runs": len(runs),
            "ticks": ticks,
            "policy_actions": sum(r["policy_actions"] for r in runs),
            "holds": runs[0]["holds"] if runs else {},
            "past_step_actions": sum(r["past_step_actions"] for r in runs),
            "tick_overruns": s["diagnostics"]["tick_overruns"],
            "loop_deadline_miss_rate": s["diagnostics"]["tick_overruns"] / max(ticks, 1),
            "inference_deadline_misses": sum(r["executor"].get("deadline_misses", 0) for r in runs),
            "inferences": sum(r["executor"].get("inferences", 0) for r in runs),
            "underruns": sum(r["executor"].get("underruns", 0) for r in runs),
            "stale_frames": s["diagnostics"]["stale_frames"],
            "rejected_messages": s["diagnostics"]["rejected_messages"],
            "safety_interventions": s["diagnostics"]["safety_interventions"],
            "executor_latency_p50_s": runs[0]["executor"].get("latency_p50_s") if runs else None,
            "executor_latency_p99_s": runs[0]["executor"].get("latency_p99_s") if runs else None,
            "mean_latency_s": runs[0]["executor"].get("mean_latency_s") if runs else None,
            "tick_jitter_p50_s": s["diagnostics"]["tick_jitter_p50_s"],
            "tick_jitter_p99_s": s["diagnostics"]["tick_jitter_p99_s"],
            "e2e_latency_p50_s": s["diagnostics"]["e2e_latency_p50_s"],
            "e2e_latency_p99_s": s["diagnostics"]["e2e_latency_p99_s"],
        }
        # ---------------------------------------------------------------- e-stop trials
        trials = []
        for i in range(args.estop_trials):
            summ = work / f"estop_{i}.json"
            summ.unlink(missing_ok=True)
            node = start(
                [*me, "node", str(domain), str(cpath), "12", str(summ)], env, work / f"estop_{i}.log"
            )
            time.sleep(3.5)
            driver.enable(True)
            time.sleep(2.0)
            n_before = len(received)
            t_e = time.time_ns()
            driver.estop()
            time.sleep(1.0)
            after = [(x - t_e) / 1e9 for x in received[n_before:] if x > t_e]
            driver.enable(False)
            stop(node, 30)
            # the e-stop is latched (transient local) for a later node too: clear it for the next trial
            driver.estop_pub.publish(msgs.bool_msg(False))
            time.sleep(0.3)
            ran = n_before > 0 and any(x > t_e - 1e9 for x in received[:n_before])
            trials.append(
                {
                    "commands_after": len(after),
                    "last_after_s": max(after) if after else 0.0,
                    "was_running": ran,
                }
            )
            print(
                f"  e-stop trial {i}: {len(after)} command(s) after, last {max(after) if after else 0:.4f} s",
                flush=True,
            )
        dt = 1 / RATE
        row["estop"] = {
            "trials": len(trials),
            "running_before": sum(x["was_running"] for x in trials),
            "gated_within_one_tick": sum(
                x["commands_after"] <= 1 and x["last_after_s"] <= dt + 0.01 for x in trials
            ),
            "max_commands_after": max(x["commands_after"] for x in trials) if trials else None,
            "last_after_s": percentiles([x["last_after_s"] for x in trials], (50, 100)),
            "per_trial": trials,
        }
    finally:
        t.close()
        stop(arm)
    row.update(info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_soak.json").write_text(json.dumps(row, indent=1, default=float) + "\n")
    write_markdown(row, out / "real_soak.md")
    print(json.dumps({k: v for k, v in row.items() if k != "estop"}, indent=1, default=float))
    return 0


def write_markdown(row: dict, path: Path) -> None:
    a, n, e = row["arm_side"], row["node_side"], row["estop"]
    lines = [
        "# Soak: the node over CycloneDDS, 30 Hz, injected faults",
        "",
        f"`{row['command']}` ({row['when']}, commit {row['git_commit']}).",
        f"{row['minutes']} min at {row['rate_hz']} Hz; inference latency injected {row['inference_latency']};"
        f" sensor messages dropped {row['sensor_drop']:.0%}, jitter up to "
        f"{row['sensor_jitter_s'] * 1000:.0f} ms.",
        "",
        "| check | target | measured |",
        "|---|---|---:|",
        f"| actions for a past step (node: written after their slot) | 0 | {n['past_step_actions']} |",
        f"| command stamps not increasing at the arm | 0 | {a['stamps_not_increasing']} |",
        f"| position-limit violations reaching the arm | 0 | {a['position_violations']} |",
        f"| velocity-limit violations reaching the arm | 0 | {a['velocity_violations']} |",
        f"| acceleration-limit violations reaching the arm | 0 | {a['acceleration_violations']} |",
        f"| control-loop deadline misses (ticks > 1 period late) | < 0.1% | "
        f"{n['tick_overruns']} of {n['ticks']}"
        f" ({100 * n['loop_deadline_miss_rate']:.3f}%) |",
        f"| e-stop gated within one tick | all of >= 20 trials | "
        f"{e['gated_within_one_tick']} of {e['trials']} |",
        "",
        f"Commands at the arm: {a['commands']}; stamp -> arm p50/p99/max {a['stamp_to_arm_s']['p50']:.4f} / "
        f"{a['stamp_to_arm_s']['p99']:.4f} / {a['stamp_to_arm_s']['max']:.4f} s.",
        f"Inferences {n['inferences']}, of which landed after their deadline (s * dt; the injected stalls) "
        f"{n['inference_deadline_misses']}; underruns (held ticks) {n['underruns']}; stale frames "
        f"{n['stale_frames']}; executor latency p50/p99 {n['executor_latency_p50_s']:.4f} / "
        f"{n['executor_latency_p99_s']:.4f} s (mean {n['mean_latency_s']:.4f}).",
        f"Tick jitter p50/p99 {n['tick_jitter_p50_s']:.5f} / {n['tick_jitter_p99_s']:.5f} s; end-to-end "
        f"(observation capture -> first command of its chunk) p50/p99 {n['e2e_latency_p50_s']:.4f} / "
        f"{n['e2e_latency_p99_s']:.4f} s.",
        f"Rejected messages: {n['rejected_messages']}; safety interventions: {n['safety_interventions']}.",
        f"E-stop: last command after the e-stop was sent p50/max {e['last_after_s']['p50']:.4f} / "
        f"{e['last_after_s']['max']:.4f} s; at most {e['max_commands_after']} command(s) after it.",
        "",
        f"Machine: {row['machine']}",
        f"Versions: {row['versions']}",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
