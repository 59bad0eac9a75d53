"""EBT-Policy on PushT: rollouts with a fixed 2-step descent and with energy-based early stopping (mean
steps used), Spearman correlation of the final energy with the action error on dataset windows, rows
appended to ``benchmarks/results/pusht.json``.

    python benchmarks/ebt_pusht.py --ckpt /work/benchruns/ebt/checkpoints/last --data /tmp/pt2/p.zarr \
        --out /work/benchruns/ebt/eval --episodes 50 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "pusht.json"


class CountingRuntime:
    """PolicyRuntime-like: samples with the given descent and records steps used / final energy."""

    def __init__(self, ckpt, sampler, num_steps, log_dir):
        import torch

        from vlaflow.policies.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        self.policy = load_checkpoint(ckpt)
        self.sampler, self.num_steps = sampler, num_steps
        self.log = Path(log_dir) / f"steps_{os.getpid()}.json"
        self.steps, self.energies = [], []

    @property
    def config(self):
        return self.policy.spec

    def reset(self):
        pass

    def infer(self, obs):
        import torch

        spec = self.config
        batch = {k: torch.from_numpy(np.asarray(obs[k])[-spec.n_obs_steps :])[None] for k in spec.obs_shapes}
        act, res = self.policy.sample_with_energy(batch, sampler=self.sampler, num_steps=self.num_steps)
        self.steps.append(int(res.steps_used[0]))
        self.energies.append(float(res.energy[0]))
        self.log.write_text(json.dumps({"steps": self.steps, "energies": self.energies}))
        return act[0].detach().numpy()


def _make(ckpt, sampler, num_steps, log_dir):
    return CountingRuntime(ckpt, sampler, num_steps, log_dir)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def heldout_windows(pol, data, n_windows, episodes_from, seed):
    """Batch of tensors for ``n_windows`` random windows of episodes >= ``episodes_from``."""
    import torch

    from vlaflow.data.store import EpisodeStore
    from vlaflow.data.windows import WindowSampler

    cfg = pol.config
    store = EpisodeStore.open(data)
    eps = np.arange(episodes_from, store.n_episodes)
    ws = WindowSampler(store, list(cfg.obs_shapes), cfg.n_obs_steps, cfg.horizon, episodes=eps)
    idx = np.random.default_rng(seed).choice(len(ws), size=min(n_windows, len(ws)), replace=False)
    return {k: torch.as_tensor(v) for k, v in ws.get_batch(np.sort(idx)).items()}


def energy_error(pol, b, sampler, num_steps):
    """Spearman(final energy, action error), MSE and steps used of a descent on held-out windows ``b``."""
    import torch

    cfg = pol.config
    obs = {k: b[k] for k in cfg.obs_shapes}
    n = len(b["action"])
    noise = torch.randn(n, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    act, res = pol.sample_with_energy(obs, noise=noise, sampler=sampler, num_steps=num_steps)
    target = pol.normalize_action(b["action"].float())
    err = ((res.x - target) ** 2).flatten(1).mean(1).numpy()
    e = res.energy.numpy()
    return {
        "spearman_energy_error": spearman(e, err),
        "mse_normalized": float(err.mean()),
        "mean_steps": float(res.steps_used.float().mean()),
        "n_windows": int(n),
    }


def energy_trace(pol, b, num_steps=10) -> list[float]:
    """Mean energy on held-out windows ``b`` after 0..num_steps descent steps from the Gaussian start."""
    import torch

    cfg = pol.config
    with torch.enable_grad():
        cond = pol.encode({k: b[k] for k in cfg.obs_shapes})
        x0 = torch.randn(
            len(b["action"]), cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(1)
        )
        res = pol.descend(cond, x0 * cfg.init_std, num_steps, record=True)
    return [float(e.mean()) for e in res.energies]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--es-cap", type=int, default=10, help="step cap of the early-stopping descent")
    p.add_argument("--windows", type=int, default=512)
    p.add_argument("--window-episodes-from", type=int, default=196, help="windows from episodes >= this")
    p.add_argument("--train-minutes", type=float, default=None)
    p.add_argument("--variants", default="descent:2,descent_es:10")
    p.add_argument(
        "--error-steps",
        default="1,2,4,10,20",
        help="descent step counts whose held-out action error is tabulated (no rollouts)",
    )
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    from vlaflow.sim.evaluate import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    from vlaflow.policies.checkpoint import load_checkpoint

    pol = load_checkpoint(args.ckpt)
    err_windows = heldout_windows(pol, args.data, args.windows, args.window_episodes_from, seed=0)
    trace_windows = heldout_windows(pol, args.data, args.windows, args.window_episodes_from, seed=1)
    summary["energy_trace_heldout"] = energy_trace(pol, trace_windows)
    print("held-out mean energy per descent step:", [round(e, 4) for e in summary["energy_trace_heldout"]])
    # held-out action error against the number of descent steps (the paper: 2 steps close to 20)
    summary["error_vs_steps"] = {}
    for k in [int(x) for x in args.error_steps.split(",") if x]:
        st = energy_error(pol, err_windows, "descent", k)
        summary["error_vs_steps"][k] = {
            "mse_normalized": st["mse_normalized"],
            "spearman": st["spearman_energy_error"],
        }
        print(
            f"descent-{k} held-out mse {st['mse_normalized']:.4f} spearman {st['spearman_energy_error']:.3f}"
        )
    for variant in args.variants.split(","):
        sampler, k = variant.split(":")
        k = int(k)
        logd = out / f"{sampler}{k}"
        logd.mkdir(exist_ok=True)
        for f in logd.glob("steps_*.json"):
            f.unlink()
        stats = energy_error(pol, err_windows, sampler, k)
        rep = evaluate(
            functools.partial(_make, args.ckpt, sampler, k, str(logd)),
            task="pusht",
            workers=args.workers,
            n_episodes=args.episodes,
            start_seed=100000,
            out_dir=logd,
            progress=False,
        )
        steps = sum((json.loads(f.read_text())["steps"] for f in logd.glob("steps_*.json")), [])
        agg = rep["aggregate"]
        summary[variant] = {
            **stats,
            "rollout_mean_steps": float(np.mean(steps)) if steps else None,
            "mean_score": agg["mean_score"],
            "success_rate": agg["success_rate"],
        }
        print(variant, json.dumps(summary[variant]), flush=True)
        rows.append(
            {
                "policy": "ebt",
                "family": "ebt",
                "sampler": f"{sampler}-{k}" + (" (early stop)" if sampler == "descent_es" else ""),
                "nfe": summary[variant]["rollout_mean_steps"],
                "nfe_note": "gradient steps on the energy per chunk (each = 1 forward + 1 backward)",
                "mean_score": round(agg["mean_score"], 4),
                "success_rate": agg["success_rate"],
                "train_minutes": args.train_minutes,
                "seeds": f"100000..{100000 + args.episodes - 1}",
                "spearman_energy_error": stats["spearman_energy_error"],
                "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                "run_dir": str(Path(args.ckpt).resolve()),
            }
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_append:
        from benchmarks._meta import append_rows

        append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
