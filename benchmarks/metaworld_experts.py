"""Meta-World's scripted experts (``metaworld.policies``) behind ``mw:<name>``: success over 100 seeds.

Each task's expert runs seeds ``seed .. seed+episodes-1`` (the training split: what ``vlaflow collect``
stores) to success or the 500-step limit. Meta-World's experts are not all perfect; the table records
what they reach, with a 95% Wilson interval, the mean episode length of the successes and the seeds that
failed. Results are written after every task, so an interrupted run keeps what it finished.

    MUJOCO_GL=egl python benchmarks/metaworld_experts.py [--tasks mw:mt10] [--episodes 100]
"""

from __future__ import annotations

import argparse
import json
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
from vlaflow.sim.harness import wilson_interval  # noqa: E402
from vlaflow.sim.tasks import TASK_SETS, expand_tasks, make_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MT10 = set(TASK_SETS["mw:mt10"])


def expert_run(task: str, episodes: int, seed: int) -> dict:
    env = make_env(task)
    expert = make_expert(task, env)
    ok, lengths, failed, steps = 0, [], [], 0
    t0 = time.perf_counter()
    for s in tqdm(range(seed, seed + episodes), desc=task, unit="ep", leave=False):
        ro = rollout_expert(env, expert, s, env.task_spec.max_steps, record=False)
        n = int(env.unwrapped._steps)
        steps += n
        if ro.success:
            ok += 1
            lengths.append(n)
        else:
            failed.append(s)
    wall = time.perf_counter() - t0
    env.close()
    lo, hi = wilson_interval(ok, episodes)
    return {
        "episodes": episodes,
        "seeds": [seed, seed + episodes - 1],
        "successes": ok,
        "success_rate": ok / episodes,
        "success_ci95": [round(lo, 4), round(hi, 4)],
        "failed_seeds": failed,
        "mean_success_length": round(float(np.mean(lengths)), 1) if lengths else None,
        "max_steps": env.task_spec.max_steps,
        "instruction": env.task_spec.instruction,
        "mt10": task in MT10,
        "wall_s": round(wall, 2),
        "steps_per_s": round(steps / wall, 1),
    }


def render_md(info: dict, results: dict) -> str:
    load0 = [round(x, 1) for x in info["machine"]["load_avg_at_start"]]
    rates = [r["success_rate"] for r in results.values()]
    mt10 = [r["success_rate"] for t, r in results.items() if r["mt10"]]
    lines = [
        "# Meta-World scripted experts (metaworld.policies) over 100 seeds per task",
        "",
        f"`{info['command']}` at {info['when']} (commit {info['git_commit']}), metaworld "
        f"{info['versions'].get('metaworld')}, mujoco {info['versions'].get('mujoco')}, "
        f"{info['machine']['cpu_count']} shared CPUs (load {load0} at start). Seeds are the training split "
        "(0..99); an episode ends at the env's success flag or after 500 steps.",
        "",
        f"Mean success: **{100 * np.mean(rates):.1f}%** over {len(rates)} tasks"
        + (f"; MT10 **{100 * np.mean(mt10):.1f}%**." if mt10 else "."),
        "",
        "| task | MT10 | success | 95% CI | mean len (successes) | failed seeds | steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        lo, hi = r["success_ci95"]
        failed = r["failed_seeds"]
        shown = ", ".join(map(str, failed[:8])) + (f", ... ({len(failed)})" if len(failed) > 8 else "")
        lines.append(
            f"| {task} | {'yes' if r['mt10'] else ''} | {r['successes']}/{r['episodes']} | "
            f"{100 * lo:.0f}-{100 * hi:.0f}% | {r['mean_success_length']} | {shown} | "
            f"{r['steps_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mw:mt50", help="a task set or comma-separated mw:<name> tasks")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/metaworld_experts.json"))
    args = ap.parse_args()
    tasks = [t for name in args.tasks.split(",") for t in expand_tasks(name)]
    info = run_info(("vlaflow", "numpy", "gymnasium", "mujoco", "metaworld"))
    out = Path(args.out)
    results: dict = {}
    for task in tqdm(tasks, desc="tasks", unit="task"):
        results[task] = expert_run(task, args.episodes, args.seed)
        info["load_avg_at_end"] = list(os.getloadavg())
        out.write_text(json.dumps({**info, "results": results}, indent=1) + "\n")
        out.with_suffix(".md").write_text(render_md(info, results))
    print(render_md(info, results))


if __name__ == "__main__":
    main()
