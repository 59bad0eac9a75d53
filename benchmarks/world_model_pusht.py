"""Open-loop k-step prediction error of the PushT low-dim diffusion world model vs two MLP baselines.

Baselines: a deterministic MLP (the normalized delta by squared error) and a Gaussian MLP ensemble (PETS: 5
members, each a mean and a bounded log-variance per dim, Gaussian NLL, each member on its own minibatches;
member width chosen so the ensemble has about the deterministic MLP's parameter count). The ensemble is
scored two ways: the mean of its members' means per step (``_mean``), and PETS' TS1 sampling (a random
member and a draw from its Gaussian per step, ``_ts1``). All models see the same inputs (the last To=2
states, angle as sin/cos, the action) and are trained for the same wall-time budget on the first 186 human
demo episodes (../shared/data/pusht_cchi_v7); the last 20 episodes are held out. From every 10th step of
every held-out episode, each model is rolled out autoregressively on the recorded actions for k steps (its
own predictions fed back) and compared with the recorded state at step k: agent position error (px), block
position error (px), block angle error (rad, wrapped). The diffusion model's rollout is one sample per step
(3 Euler steps), not a mean.

    nice -n 10 env PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/world_model_pusht.py --seconds 240 \
        --clock cpu --models wm,mlp,ensemble

(``--clock cpu``: every model gets the same CPU seconds of this 1-thread process, whatever else runs on
the machine; with ``--clock wall`` a shared machine's load changes the steps each model gets.)

Writes benchmarks/results/world_model.json (+ .md). Short trainings on a shared 2-core CPU (wall-time
budgets, so the machine's load enters): a measurement, not a converged comparison; image models are not run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

from vlaflow.world_models.config import PRESETS  # noqa: E402
from vlaflow.world_models.data import train_world_model, transition_windows  # noqa: E402
from vlaflow.world_models.model import wrap_angle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZARR = ROOT.parent / "shared" / "data" / "pusht_cchi_v7" / "pusht_cchi_v7_replay.zarr"
KS = (1, 8, 32, 100)


def load_episodes():
    import zarr

    g = zarr.open_group(str(ZARR), mode="r")
    state = np.asarray(g["data/state"][:], np.float32)
    action = np.asarray(g["data/action"][:], np.float32)
    ends = np.asarray(g["meta/episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]])
    return [(state[a:b], action[a:b]) for a, b in zip(starts, ends, strict=True)]


def _mish_mlp(in_dim: int, width: int, n_blocks: int, out_dim: int) -> nn.Sequential:
    layers = [nn.Linear(in_dim, width), nn.Mish()]
    for _ in range(n_blocks):
        layers += [nn.Linear(width, width), nn.Mish()]
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def _in_dim(c) -> int:
    return c.n_obs_steps * (c.obs_dim + 2 * len(c.angle_dims)) + c.action_dim


class MLPTransition(nn.Module):
    """Deterministic baseline: the same condition as the world model -> the normalized delta."""

    def __init__(self, wm_like, width: int = 256, n_blocks: int = 6):
        super().__init__()
        self.cfg, self.norm = wm_like.config, wm_like.normalizer
        self.net = _mish_mlp(_in_dim(self.cfg), width, n_blocks, self.cfg.obs_dim)
        self.__dict__["wm_like"] = wm_like  # for its normalizer / target maths only: not a submodule

    def features(self, win, act):
        c = self.cfg
        parts = [self.norm.normalize(c.obs_key, win).flatten(1)]
        ang = win[..., list(c.angle_dims)]
        parts += [torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)]
        parts.append(self.norm.normalize(c.action_key, act).flatten(1))
        return torch.cat(parts, -1)

    def forward(self, win, act):  # normalized delta (B, 1, Do)
        return self.net(self.features(win, act)).unsqueeze(1)

    def loss(self, o, a, tgt):
        return ((self(o, a) - tgt) ** 2).mean()

    @torch.no_grad()
    def predict_next(self, win, act, generator=None):
        d = self.norm.unnormalize(self.cfg.target_key, self(win, act))
        return self.wm_like.next_from(win, d)


class GaussianEnsemble(MLPTransition):
    """PETS' probabilistic ensemble: ``n_members`` MLPs, each -> mean and bounded log-variance of the
    normalized delta; Gaussian NLL per member on its own minibatch. ``mode``: "mean" (mean of the members'
    means) or "ts1" (a random member, a draw from its Gaussian, per step and rollout)."""

    def __init__(self, wm_like, n_members: int = 5, width: int = 112, n_blocks: int = 6, mode: str = "mean"):
        nn.Module.__init__(self)
        self.cfg, self.norm, self.mode = wm_like.config, wm_like.normalizer, mode
        do = self.cfg.obs_dim
        self.members = nn.ModuleList(
            _mish_mlp(_in_dim(self.cfg), width, n_blocks, 2 * do) for _ in range(n_members)
        )
        self.max_logvar = nn.Parameter(torch.full((do,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((do,), -10.0))
        self.__dict__["wm_like"] = wm_like

    def heads(self, x):  # x (E, B, F) -> mean, logvar (E, B, Do)
        out = torch.stack([m(x[i]) for i, m in enumerate(self.members)])
        mean, lv = out.chunk(2, -1)
        lv = self.max_logvar - nn.functional.softplus(self.max_logvar - lv)
        lv = self.min_logvar + nn.functional.softplus(lv - self.min_logvar)
        return mean, lv

    def loss(self, o, a, tgt):  # o, a, tgt carry a leading member dim E (each member its own batch)
        e, b = o.shape[:2]
        x = self.features(o.flatten(0, 1), a.flatten(0, 1)).view(e, b, -1)
        mean, lv = self.heads(x)
        nll = (((mean - tgt[:, :, 0]) ** 2) * torch.exp(-lv) + lv).mean()
        return nll + 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())

    def forward(self, win, act):
        x = self.features(win, act)
        mean, lv = self.heads(x.expand(len(self.members), *x.shape))
        return mean, lv

    @torch.no_grad()
    def predict_next(self, win, act, generator=None):
        mean, lv = self(win, act)  # (E, B, Do)
        if self.mode == "mean":
            d = mean.mean(0)
        else:
            pick = torch.randint(0, len(self.members), (len(win),), generator=generator)
            rows = torch.arange(len(win))
            noise = torch.randn(mean.shape[1:], generator=generator)
            d = mean[pick, rows] + torch.exp(0.5 * lv[pick, rows]) * noise
        d = self.norm.unnormalize(self.cfg.target_key, d.unsqueeze(1))
        return self.wm_like.next_from(win, d)


def ensemble_width(wm_like, target_params: int, n_members: int = 5, n_blocks: int = 6) -> int:
    """The member width whose ensemble has the parameter count closest to ``target_params``."""

    def count(w):
        return sum(p.numel() for p in GaussianEnsemble(wm_like, n_members, w, n_blocks).parameters())

    return min(range(16, 257, 4), key=lambda w: abs(count(w) - target_params))


class MeanOf(nn.Module):
    """The world model's prediction averaged over ``m`` samples per step (a deterministic estimate)."""

    def __init__(self, wm, m: int):
        super().__init__()
        self.wm, self.m = wm, m

    @torch.no_grad()
    def predict_next(self, win, act, generator=None):
        out = self.wm.predict_next(
            win.repeat_interleave(self.m, 0), act.repeat_interleave(self.m, 0), generator
        )
        out = out.view(len(win), self.m, *out.shape[1:])
        mean = out.mean(1)
        for d in self.wm.config.angle_dims:  # circular mean of angles
            mean[..., d] = torch.remainder(
                torch.atan2(torch.sin(out[..., d]).mean(1), torch.cos(out[..., d]).mean(1)), 2 * math.pi
            )
        return mean


def train_mlp(mlp, win, seconds, batch=256, lr=1e-3, seed=0, members: int = 0, clock=time.monotonic):
    """Adam on ``mlp.loss`` for ``seconds`` of ``clock``; ``members`` > 0: each member its own batch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    o, a, nx = (torch.from_numpy(win[k]) for k in ("obs", "act", "next"))
    tgt = mlp.norm.normalize(mlp.cfg.target_key, mlp.wm_like.target_from(o, nx))
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=1e-6)
    t0, steps = clock(), 0
    while clock() - t0 < seconds and steps < 200_000:
        idx = torch.from_numpy(rng.integers(0, len(o), (members, batch) if members else batch))
        loss = mlp.loss(o[idx], a[idx], tgt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return mlp.eval(), steps


@torch.no_grad()
def kstep_errors(model, episodes, to, tf=1, every=10, seed=0):
    """Errors at each k in KS that is a multiple of ``tf`` (a Tf-step model is called k / Tf times)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in (k for k in KS if k % tf == 0):
        wins, acts, truth = [], [], []
        for s, a in episodes:
            pad = np.concatenate([np.repeat(s[:1], to - 1, 0), s])
            for t in range(0, len(s) - k, every):
                wins.append(pad[t : t + to])
                acts.append(a[t : t + k])
                truth.append(s[t + k])
        win = torch.from_numpy(np.stack(wins))
        act, tru = torch.from_numpy(np.stack(acts)), torch.from_numpy(np.stack(truth))
        for j in range(0, k, tf):
            nxt = model.predict_next(win, act[:, j : j + tf], generator=g)
            win = torch.cat([win, nxt], 1)[:, -to:]
        pred = win[:, -1]
        out[k] = {
            "n": len(tru),
            "agent_px": float((pred[:, :2] - tru[:, :2]).norm(dim=1).mean()),
            "block_px": float((pred[:, 2:4] - tru[:, 2:4]).norm(dim=1).mean()),
            "angle_rad": float(wrap_angle(pred[:, 4] - tru[:, 4]).abs().mean()),
            "nan_fraction": float((~torch.isfinite(pred).all(1)).float().mean()),
        }
    return out


def _baseline_config(model) -> dict:
    if isinstance(model, GaussianEnsemble):
        first = model.members[0]
        return {
            "members": len(model.members),
            "width": first[0].out_features,
            "hidden_layers": sum(isinstance(m, nn.Linear) for m in first) - 1,
            "mode": model.mode,
            "loss": "gaussian_nll",
        }
    return {
        "width": model.net[0].out_features,
        "hidden_layers": sum(isinstance(m, nn.Linear) for m in model.net) - 1,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0, help="training time per model (see --clock)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="budget in wall seconds or in this process's CPU seconds (1 thread: unaffected by other load)",
    )
    ap.add_argument("--holdout", type=int, default=20)
    ap.add_argument("--action-encoding", default="two_hot", choices=["two_hot", "continuous"])
    ap.add_argument("--n-future", type=int, default=1, help="Tf of the world model (the MLP is Tf = 1)")
    ap.add_argument("--models", default="wm,mlp", help="comma list of wm, mlp, ensemble")
    ap.add_argument("--members", type=int, default=5, help="members of the Gaussian ensemble")
    ap.add_argument(
        "--mean-of", type=int, default=0, help="also score the WM with the mean of this many samples per step"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "world_model.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = run_info()
    eps = load_episodes()
    train_eps, held = eps[: -args.holdout], eps[-args.holdout :]
    cfg = PRESETS["pusht_lowdim"].replace(action_encoding=args.action_encoding, n_future=args.n_future)
    todo = set(args.models.split(","))
    win = transition_windows(train_eps, cfg.n_obs_steps, cfg.n_future)
    clock = time.process_time if args.clock == "cpu" else time.monotonic
    t0 = clock()
    wm, hist = train_world_model(
        cfg, win, steps=10**6, batch_size=256, lr=1e-3, max_seconds=args.seconds, log_every=500, clock=clock
    )
    wm_s, wm_steps = clock() - t0, hist[-1]["step"] + 1
    tag = f"diffusion_wm_{args.action_encoding}" + (f"_tf{cfg.n_future}" if cfg.n_future > 1 else "")
    runs = [(tag, wm, wm_steps)] if "wm" in todo else []
    if "mlp" in todo and cfg.n_future == 1:
        mlp, mlp_steps = train_mlp(MLPTransition(wm), win, args.seconds, clock=clock)
        runs.append(("mlp_deterministic", mlp, mlp_steps))
    if "ensemble" in todo and cfg.n_future == 1:
        n_mlp = sum(p.numel() for p in MLPTransition(wm).parameters())
        width = ensemble_width(wm, n_mlp, args.members)
        ens, ens_steps = train_mlp(
            GaussianEnsemble(wm, args.members, width), win, args.seconds, members=args.members, clock=clock
        )
        runs.append((f"gaussian_ensemble{args.members}_mean", ens, ens_steps))
        ts1 = GaussianEnsemble(wm, args.members, width, mode="ts1")
        ts1.load_state_dict(ens.state_dict())
        runs.append((f"gaussian_ensemble{args.members}_ts1", ts1.eval(), ens_steps))
    if "wm" in todo and args.mean_of > 1:
        runs.append(
            (
                f"diffusion_wm_{args.action_encoding}_mean_of_{args.mean_of}",
                MeanOf(wm, args.mean_of),
                wm_steps,
            )
        )
    rows = []
    for name, model, steps in runs:
        t1 = time.monotonic()
        errs = kstep_errors(model, held, cfg.n_obs_steps, cfg.n_future if name.startswith("diffusion") else 1)
        rows.append(
            {
                "benchmark": "world_model_pusht_open_loop",
                "model": name,
                "train_seconds": round(wm_s if name.startswith("diffusion") else args.seconds, 1),
                "train_steps": int(steps),
                "train_clock": args.clock,
                "n_params": sum(p.numel() for p in model.parameters()),
                "n_train_windows": int(len(win["obs"])),
                "n_heldout_episodes": len(held),
                "eval_seconds": round(time.monotonic() - t1, 1),
                "k_step_error": {str(k): v for k, v in errs.items()},
                "config": cfg.to_dict() if name.startswith("diffusion") else _baseline_config(model),
                **info,
            }
        )
        print(name, steps, {k: {m: round(x, 3) for m, x in v.items()} for k, v in errs.items()})
    append_rows(args.out, rows)
    md = Path(args.out).with_suffix(".md")
    lines = [
        f"## PushT open-loop k-step error ({info['when']}, `{info['command']}`)",
        "",
        "Held-out = last 20 human episodes; rollouts from every 10th step on recorded actions; mean errors.",
        "",
        f"| model | train {args.clock} s / steps | params | "
        + " | ".join(f"k={k} block px / angle rad / agent px" for k in KS)
        + " |",
        "|---|---|---|" + "---|" * len(KS),
    ]
    for r in rows:
        e = r["k_step_error"]
        cells = " | ".join(
            f"{e[str(k)]['block_px']:.2f} / {e[str(k)]['angle_rad']:.3f} / {e[str(k)]['agent_px']:.1f}"
            if str(k) in e
            else "n/a"
            for k in KS
        )
        lines.append(
            f"| {r['model']} | {r['train_seconds']} / {r['train_steps']} | {r['n_params']} | {cells} |"
        )
    lines.append(f"\nmachine: {info['machine']}; versions: {info['versions']}; commit {info['git_commit']}\n")
    with open(md, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
