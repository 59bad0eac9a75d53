"""Throughput: batched imagination (WorldModelEnv) vs the real PushT sim (SubprocChunkEnv), env steps / s.

The world model is the PushT preset's architecture (446k-parameter MLP head, 3 Euler steps, M samples per
step for the uncertainty); throughput does not depend on its weights, so it is built with the statistics
of the human demos and left untrained (``range_margin`` is opened so no episode ends as out of range).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/world_model_costs.py --n-envs 50 --chunks 10

Appends rows to benchmarks/results/world_model.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402
from world_model_pusht import load_episodes  # noqa: E402

from vlaflow.world_models.config import PRESETS  # noqa: E402
from vlaflow.world_models.data import episode_starts, fit_normalizer, transition_windows  # noqa: E402
from vlaflow.world_models.env import WorldModelEnv  # noqa: E402
from vlaflow.world_models.model import DiffusionWorldModel  # noqa: E402
from vlaflow.world_models.reward import pusht_reward  # noqa: E402


def run(venv, n, ta, chunks, rng) -> tuple[int, float]:
    venv.reset(list(range(n)))
    t0, steps = time.perf_counter(), 0
    for _ in range(chunks):
        _, _, done, _ = venv.step(rng.uniform(100, 400, (n, ta, 2)))
        steps += int((~done).sum()) * ta  # approximately: envs still running after the chunk
    return steps, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-envs", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ta", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "world_model.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = run_info()
    eps = load_episodes()
    rows = []
    for tf, m in ((1, 2), (1, 1), (args.ta, 2)):
        cfg = PRESETS["pusht_lowdim"].replace(n_future=tf)
        wm = DiffusionWorldModel(cfg, fit_normalizer(cfg, transition_windows(eps, 2, tf))).eval()
        venv = WorldModelEnv(
            wm,
            episode_starts(eps),
            args.n_envs,
            2,
            pusht_reward,
            n_samples=m,
            range_margin=1e6,
            terminate_on_success=False,
        )
        steps, sec = run(venv, args.n_envs, args.ta, args.chunks, np.random.default_rng(0))
        rows.append(
            {
                "benchmark": "world_model_costs",
                "env": f"imagined (n_future={tf}, samples={m}, 3 Euler steps)",
                "n_envs": args.n_envs,
                "steps": venv.imagined_steps,
                "seconds": round(sec, 3),
                "steps_per_s": round(venv.imagined_steps / sec, 1),
                "model_calls": venv.model_calls,
                **info,
            }
        )
        print(rows[-1]["env"], rows[-1]["steps_per_s"], "steps/s")
    from vlaflow.sim.rollout import SubprocChunkEnv

    with SubprocChunkEnv("pusht", args.n_envs, ["obs.state"], 2, workers=args.workers) as venv:
        venv.reset(list(range(args.n_envs)))
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(args.chunks):
            venv.step(rng.uniform(100, 400, (args.n_envs, args.ta, 2)))
        sec = time.perf_counter() - t0
        rows.append(
            {
                "benchmark": "world_model_costs",
                "env": f"real pusht sim ({args.workers} worker processes)",
                "n_envs": args.n_envs,
                "steps": venv.env_steps,
                "seconds": round(sec, 3),
                "steps_per_s": round(venv.env_steps / sec, 1),
                **info,
            }
        )
        print(rows[-1]["env"], rows[-1]["steps_per_s"], "steps/s")
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
