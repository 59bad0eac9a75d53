"""EBT-Policy warm-started by RTI-DP's scheme on PushT: score, success, gradient steps per control step, and
the final energy as an uncertainty signal (AUROC of the per-episode energy for failed vs successful
episodes); rows appended to ``benchmarks/results/pusht.json``.

    python benchmarks/ebt_rti.py --ckpt runs/ebt_rti/checkpoints/last --warm 2 --exec-horizon 1 \\
        --episodes 200 --seed 100000 --workers 1 --out runs/ebt_rti/eval --train-minutes 50

The first call of an episode is the checkpoint's own descent from noise; every later call descends
``--warm`` gradient steps from the previous chunk shifted by the steps executed since
(:func:`vlaflow.deploy.rti._energy_rti`), through the sim harness's real-time executor (``--exec-horizon 1``:
replan at every control tick, shift 1; 0: every Ta steps). Each call's final energy is logged per episode;
the per-episode summary chosen before measuring is the mean over the episode's calls (the max is reported
too). AUROC: the probability that a failed episode has a higher energy than a successful one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "pusht.json"


class EnergyLoggingRTI:
    """The RTI runtime over an EBT checkpoint, logging each call's final energy under the episode's seed."""

    def __init__(self, ckpt: str, n_warm: int, log_dir: str):
        import torch

        from vlaflow.deploy.rti import load_rti_policy

        torch.set_num_threads(1)
        self.rt = load_rti_policy(ckpt, n_warm_steps=n_warm)
        self.log = Path(log_dir) / f"energy_{os.getpid()}.txt"  # append-only: "reset SEED" / "SEED ENERGY"
        self.seed: int | None = None

    @property
    def config(self):
        return self.rt.config

    def reset(self, seed: int | None = None) -> None:
        self.rt.reset(seed)
        self.seed = seed
        self._write(f"reset {seed}")  # a rerun episode (its worker died) starts its record again

    def infer(self, obs, **kw):
        out = self.rt.infer(obs, **kw)
        self._write(f"{self.seed} {out.extras['energy']!r}")
        return out

    def _write(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")


def read_energies(log_dir: Path) -> dict[str, list[float]]:
    """Each episode's per-call final energies, by seed, from the workers' logs."""
    by_seed: dict[str, list[float]] = {}
    for f in log_dir.glob("energy_*.txt"):
        for line in f.read_text().splitlines():
            a, b = line.split()
            if a == "reset":
                by_seed[b] = []
            else:
                by_seed.setdefault(a, []).append(float(b))
    return by_seed


def _make(ckpt: str, n_warm: int, log_dir: str) -> EnergyLoggingRTI:
    return EnergyLoggingRTI(ckpt, n_warm, log_dir)


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    if len(scores_pos) == 0 or len(scores_neg) == 0:
        return None
    p, n = np.asarray(scores_pos)[:, None], np.asarray(scores_neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def warm_precision(ckpt: str, data: str, episodes_from: int = 196, n_windows: int = 512) -> dict:
    """Normalized MSE to the expert chunk on held-out windows after k gradient steps from noise and from the
    expert chunk shifted by s (its last s actions replaced by the one before them: a perfect warm start).
    A descent that holds good warm starts keeps the shifted-start error near the start's own."""
    import torch

    from benchmarks.ebt_pusht import heldout_windows
    from vlaflow.policies.checkpoint import load_checkpoint

    pol = load_checkpoint(ckpt)
    cfg = pol.config
    b = heldout_windows(pol, data, n_windows, episodes_from, 0)
    target = pol.normalize_action(b["action"].float())
    with torch.enable_grad():
        cond = pol.encode({k: b[k] for k in cfg.obs_shapes})

    def mse(start, steps, warm):
        r = pol.descend_from(cond, start, "descent", steps, num_candidates=1, warm=warm)
        return round(float(((r.x - target) ** 2).mean()), 5)

    g = torch.Generator().manual_seed(0)
    out = {
        "from_noise": {
            k: mse(torch.randn(target.shape, generator=g) * cfg.init_std, k, False) for k in (1, 2, 4)
        }
    }
    h = cfg.horizon
    for s in (1, 8):
        start = target[:, torch.clamp(torch.arange(h), max=h - 1 - s)]
        out[f"from_shifted_expert_s{s}"] = {
            "start": round(float(((start - target) ** 2).mean()), 5),
            **{k: mse(start, k, True) for k in (1, 2)},
        }
    out["windows"] = f"{len(target)} windows of episodes >= {episodes_from}"
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="EBT checkpoint directory")
    p.add_argument("--warm", default="2", help="comma list of warm descent steps per later call")
    p.add_argument("--exec-horizon", type=int, default=1, help="control steps between calls (0: Ta)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=100000, help="first episode seed")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", required=True, help="evaluation reports and energy logs")
    p.add_argument("--train-minutes", type=float, default=None, help="the checkpoint's training minutes")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument(
        "--data", default="", help="PushT store: also measure the warm-start precision on held-out windows"
    )
    p.add_argument("--no-append", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks._meta import append_rows, run_info
    from vlaflow.deploy.executor import RealtimeConfig
    from vlaflow.sim.evaluate import evaluate
    from vlaflow.sim.harness import wilson_interval
    from vlaflow.sim.realtime import SimRealtimeConfig

    info = run_info()
    rows = []
    precision = warm_precision(args.ckpt, args.data) if args.data else None
    if precision:
        print(json.dumps({"warm_precision": precision}), flush=True)
    for n_warm in [int(x) for x in args.warm.split(",")] if args.episodes > 0 else []:
        out = Path(args.out) / f"warm{n_warm}_s{args.exec_horizon}"
        if out.exists():
            raise SystemExit(f"{out} exists; choose another --out")
        logs = out / "energy"
        logs.mkdir(parents=True)
        t0 = time.perf_counter()
        rep = evaluate(
            functools.partial(_make, args.ckpt, n_warm, str(logs)),
            task="pusht",
            n_episodes=args.episodes,
            start_seed=args.seed,
            workers=args.workers,
            executor="realtime",
            realtime=SimRealtimeConfig(RealtimeConfig(merge="rti", exec_horizon=args.exec_horizon)),
            out_dir=out / "eval",
        )
        energies = read_energies(logs)
        eps = rep["episodes"]
        ok = np.array([e["success"] for e in eps])
        e_mean = np.array([np.mean(energies[str(e["seed"])]) for e in eps])
        e_max = np.array([np.max(energies[str(e["seed"])]) for e in eps])
        agg, ex = rep["aggregate"], rep["aggregate"].get("executor", {})
        first50 = [e for e in eps if e["seed"] < args.seed + 50]
        row = {
            "policy": "ebt",
            "family": "ebt",
            "sampler": f"rti-descent: first call descent-{ex.get('nfe_first')}, then {n_warm} warm steps"
            f" every {args.exec_horizon or 'Ta'} tick(s)",
            "nfe": n_warm,
            "nfe_per_control_step": ex.get("nfe_per_control_step"),
            "mean_score": round(agg["mean_score"], 4),
            "success_rate": agg["success_rate"],
            "success_ci95": list(wilson_interval(int(ok.sum()), len(ok))),
            "mean_score_first50": round(float(np.mean([e["max_reward"] for e in first50])), 4)
            if first50
            else None,
            "n_episodes": len(eps),
            "seeds": f"{args.seed}..{args.seed + args.episodes - 1}",
            "energy_auroc_fail_vs_success": {
                "mean": auroc(e_mean[~ok], e_mean[ok]),
                "max": auroc(e_max[~ok], e_max[ok]),
            },
            "warm_precision_heldout_mse": precision,
            "train_minutes": args.train_minutes,
            "eval_minutes": round((time.perf_counter() - t0) / 60, 2),
            "checkpoint": args.ckpt,
            **info,
        }
        print(json.dumps({k: v for k, v in row.items() if k not in info}), flush=True)
        rows.append(row)
    if not args.no_append:
        append_rows(args.results, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
