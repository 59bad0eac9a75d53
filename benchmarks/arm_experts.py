"""Scripted-expert success and env throughput for the arm tasks (pick_place, lift, can).

Targets (issue 3): expert success >= 95% over 100 seeds per task; pick_place >= 300 env steps/s low-dim.
Per task: the expert runs seeds ``seed .. seed+episodes-1`` (success, episode length, wall time), then
env steps/s is measured with random actions in low-dim mode and with cameras (84x84).
Results are written after every task, so an interrupted run keeps what it finished.

    MUJOCO_GL=egl python benchmarks/arm_experts.py [--tasks pick_place,lift,can] [--episodes 100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.sim.collect import rollout_expert  # noqa: E402
from vlaflow.sim.experts import make_expert  # noqa: E402
from vlaflow.sim.tasks import make_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wilson95(k: int, n: int) -> list[float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return [0.0, 1.0]
    z, p = 1.96, k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def expert_run(task: str, episodes: int, seed: int) -> dict:
    t0 = time.perf_counter()
    env = make_env(task)
    make_s = time.perf_counter() - t0
    expert = make_expert(task, env)
    ok, lengths, failed = 0, [], []
    t1 = time.perf_counter()
    steps = 0
    for s in tqdm(range(seed, seed + episodes), desc=f"{task} expert", unit="ep"):
        ro = rollout_expert(env, expert, s, env.task_spec.max_steps, record=False)
        ok += ro.success
        steps += int(env.unwrapped._steps)
        lengths.append(int(env.unwrapped._steps))
        if not ro.success:
            failed.append(s)
    wall = time.perf_counter() - t1
    env.close()
    return {
        "episodes": episodes,
        "seeds": [seed, seed + episodes - 1],
        "successes": ok,
        "success_rate": ok / episodes,
        "success_ci95": wilson95(ok, episodes),
        "failed_seeds": failed,
        "mean_length": float(np.mean(lengths)),
        "max_length": int(np.max(lengths)),
        "max_steps": env.task_spec.max_steps,
        "fps": env.task_spec.fps,
        "wall_s": round(wall, 2),
        "env_create_s": round(make_s, 2),
        "expert_steps_per_s": round(steps / wall, 1),
        "target_success": 0.95,
        "pass": ok / episodes >= 0.95,
    }


def env_rate(task: str, obs_mode: str, steps: int) -> dict:
    kw = {"image_size": 84} if obs_mode == "image" else {}
    env = make_env(task, obs_mode=obs_mode, **kw)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    low, high = np.array(env.task_spec.action_low), np.array(env.task_spec.action_high)
    for _ in range(3):  # warm-up (first-call compilation, GL context)
        env.step(rng.uniform(low, high).astype(np.float32))
    t0 = time.perf_counter()
    for i in range(steps):
        _, _, term, trunc, _ = env.step(rng.uniform(low, high).astype(np.float32))
        if term or trunc:
            env.reset(seed=i)
    rate = steps / (time.perf_counter() - t0)
    cams = env.task_spec.extra.get("cameras", [])
    env.close()
    return {
        "steps": steps,
        "steps_per_s": round(rate, 1),
        "cameras": cams,
        "image_size": 84 if cams else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="pick_place,lift,can")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-steps", type=int, default=300, help="steps for the low-dim steps/s measurement")
    ap.add_argument(
        "--image-rate-steps", type=int, default=60, help="steps for the camera steps/s measurement"
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/arm_experts.json"))
    args = ap.parse_args()
    info = run_info(("vlaflow", "numpy", "gymnasium", "pybullet", "robosuite", "mujoco"))
    info["machine"]["MUJOCO_GL"] = os.environ.get("MUJOCO_GL")
    results: dict = {}
    out = Path(args.out)
    for task in args.tasks.split(","):
        r = {"expert": expert_run(task, args.episodes, args.seed)}
        r["env_lowdim"] = env_rate(task, "lowdim", args.rate_steps)
        r["env_image"] = env_rate(task, "image", args.image_rate_steps)
        if task == "pick_place":
            r["env_lowdim"]["target_steps_per_s"] = 300
            r["env_lowdim"]["pass"] = r["env_lowdim"]["steps_per_s"] >= 300
        results[task] = r
        print(json.dumps({task: r}, indent=1))
        info["load_avg_at_end"] = list(os.getloadavg())
        out.write_text(json.dumps({**info, "results": results}, indent=1) + "\n")
    load0 = [round(x, 1) for x in info["machine"]["load_avg_at_start"]]
    load1 = [round(x, 1) for x in info["load_avg_at_end"]]
    md = [
        "# Arm tasks: scripted experts and env throughput",
        "",
        f"`{info['command']}` at {info['when']} (commit {info['git_commit']}), "
        f"{info['machine']['cpu_count']} CPUs shared with other jobs "
        f"(load average {load0} at start, {load1} at end), "
        f"MUJOCO_GL={info['machine']['MUJOCO_GL']}.",
        "",
        "| task | expert success | 95% CI | mean len | wall s | low-dim steps/s | camera steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        e = r["expert"]
        md.append(
            f"| {task} | {e['successes']}/{e['episodes']} | {e['success_ci95']} | {e['mean_length']:.1f} | "
            f"{e['wall_s']} | {r['env_lowdim']['steps_per_s']} | {r['env_image']['steps_per_s']} "
            f"({'+'.join(r['env_image']['cameras'])} 84x84) |"
        )
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
