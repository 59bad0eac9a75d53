"""How much sampling noise a PushT policy tolerates: rollout success of the RL sampling chain per setting.

    OMP_NUM_THREADS=1 python benchmarks/rl_chain_noise.py --policy CKPT [--episodes 64] [--seed 60000] \\
        [--settings 0:0 1:0.1 1:0.03 ...]

DPPO and RL-100 explore with the chain they optimise: stochastic DDIM (eta) with the per-step std floored
at ``min_std``, in normalized action units. This runs that exact chain (``vlaflow.rl.rollout.collect``,
K = the policy's inference steps) from the policy's own weights on training seeds (60000.. by default:
never the held-out 100000..100199) and reports rollout success per ``eta:min_std``; ``0:0`` is the
deterministic sampler the policy deploys with. A chain whose success is far below the deterministic one
explores around a different, worse policy than the one that is evaluated. Appends rows to
``benchmarks/results/rl_chain_noise.json`` and rewrites ``rl_chain_noise.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def main() -> int:
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.rl.chain import ChainConfig, resolve_chain
    from vlaflow.rl.rollout import collect
    from vlaflow.sim.rollout import SubprocChunkEnv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=60000, help="first training seed (not 100000..100199)")
    ap.add_argument(
        "--settings", nargs="+", default=["0:0", "1:0.1", "1:0.05", "1:0.03", "1:0.02", "1:0.01", "1:0"]
    )
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    if a.seed < 100200 and a.seed + a.episodes > 100000:
        ap.error("--seed range overlaps the held-out evaluation seeds 100000..100199")
    torch.set_num_threads(1)
    pol = load_checkpoint(a.policy).eval()
    ta = int(pol.config.n_action_steps)
    n_dec = math.ceil(300 / ta)
    seeds = list(range(a.seed, a.seed + a.episodes))
    rows = []
    with SubprocChunkEnv("pusht", a.episodes, tuple(pol.config.obs_shapes), pol.config.n_obs_steps) as venv:
        for s in a.settings:
            eta, min_std = map(float, s.split(":"))
            # eta = 0 with no floor is the deterministic sampler: run it as a vanishing eta (the chain
            # machinery refuses a chain with no noise at all, as refine does)
            cfg = ChainConfig(eta=max(eta, 1e-9), min_std=min_std)
            chain = resolve_chain(pol, cfg, "mean_executed", ta)
            t0 = time.time()
            with torch.no_grad():
                roll = collect(pol, pol, chain, venv, seeds, n_dec, ta, torch.Generator().manual_seed(0))
            succ = roll["success"].any(0)
            k = int(succ.sum())
            rows.append({
                "eta": eta, "min_std": min_std, "episodes": a.episodes, "successes": k,
                "success_rate": k / a.episodes, "success_ci95": wilson(k, a.episodes),
                "per_seed": "".join("1" if x else "0" for x in succ.tolist()),
                "wall_s": round(time.time() - t0, 1),
            })  # fmt: skip
            print(
                json.dumps({x: rows[-1][x] for x in ("eta", "min_std", "success_rate", "wall_s")}), flush=True
            )
    info = run_info()
    out = [{"policy": a.policy, "seeds": f"{a.seed}..{a.seed + a.episodes - 1}", **r, **info}
           for r in rows]  # fmt: skip
    res = Path(a.results)
    append_rows(res / "rl_chain_noise.json", out)
    write_md(json.loads((res / "rl_chain_noise.json").read_text()), res / "rl_chain_noise.md")
    return 0


def write_md(rows: list[dict], path: Path) -> None:
    lines = [
        "# Rollout success of the RL sampling chain (benchmarks/rl_chain_noise.py)",
        "",
        "Stochastic DDIM with eta and the per-step std floored at min_std (normalized action units):",
        "the chain DPPO / RL-100 explore with; `0 / 0` is the deterministic sampler the policy deploys with.",
        "PushT, 300 steps, training seeds (never the held-out 100000..100199). Command, machine and",
        "versions per row in rl_chain_noise.json.",
        "",
        "| when | policy | seeds | eta | min_std | success (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["success_ci95"]
        lines.append(
            f"| {r['when']} | {r['policy']} | {r['seeds']} | {r['eta']:g} | {r['min_std']:g} | "
            f"{100 * r['success_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
