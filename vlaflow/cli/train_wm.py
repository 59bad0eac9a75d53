"""``vlaflow train-wm``: train a diffusion world model on an episode store with the one training loop.

The world model is one more objective on :class:`vlaflow.train.loop.TrainingLoop` (its denoising loss over
transition windows, batches a pure function of (seed, step) as behaviour cloning's), so resume, ``log.csv``,
``curves.png`` and atomic checkpoints come from the loop. ``RUN/checkpoints/last`` loads with
:func:`vlaflow.world_models.load_world_model`. The last ``--holdout`` episodes are left out of training and
scored at the end (one-step and open-loop 8-step error), written to ``RUN/world_model.json``.

``--success-classifier`` also trains the success classifier head (World4RL's reward) on the store's states
labelled by its episode success flags (or a per-step ``--success-key``), scores its AUROC on the held-out
episodes, and puts it into ``RUN/checkpoints/last`` with the imagined reward choice (``--reward``, default
``classifier`` when trained, else ``coverage``); both are recorded in ``RUN/world_model.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vlaflow.train.provenance as P
import vlaflow.train.schedule as S
from vlaflow.errors import VlaflowError
from vlaflow.train.loop import LoopConfig, RunMeta, TrainingLoop
from vlaflow.train.objective import Objective
from vlaflow.world_models.checkpoint import load_world_model, save_success_classifier
from vlaflow.world_models.config import PRESETS
from vlaflow.world_models.data import (
    batch_of,
    episodes_from_store,
    fit_normalizer,
    success_labels,
    transition_windows,
)
from vlaflow.world_models.model import DiffusionWorldModel
from vlaflow.world_models.reward import auroc, train_success_classifier


class WorldModelObjective(Objective):
    """The world model's EDM denoising loss on transition windows (see :mod:`vlaflow.world_models`)."""

    prefetch = "parallel"

    def __init__(
        self, model: DiffusionWorldModel, windows: dict[str, np.ndarray], batch_size: int, seed: int
    ):
        self.module, self.windows, self.batch_size, self.seed = model, windows, batch_size, seed

    def batch(self, step: int) -> dict[str, Tensor]:
        idx = S.batch_indices(self.seed, step, len(self.windows["obs"]), self.batch_size)
        return batch_of(self.module.config, self.windows, idx)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        return self.module.compute_loss(batch)


def add_train_wm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="episode store (e.g. from `vlaflow ingest` of PushT)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--preset", default="pusht_lowdim", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-obs-steps", type=int, default=0, help="To (0: the preset's)")
    p.add_argument("--n-future", type=int, default=0, help="Tf next steps per call (0: the preset's)")
    p.add_argument("--action-encoding", default="", choices=["", "two_hot", "continuous"])
    p.add_argument("--holdout", type=int, default=20, help="last N episodes left out and scored")
    p.add_argument("--max-minutes", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--success-classifier",
        action="store_true",
        help="also train the success classifier head on the store's success flags (or --success-key)",
    )
    p.add_argument(
        "--success-tail", type=int, default=10, help="last steps of a successful episode labelled 1"
    )
    p.add_argument("--success-key", default=None, help="per-step reward/success key for labels instead")
    p.add_argument("--success-threshold", type=float, default=1.0, help="label = success-key value >= this")
    p.add_argument("--success-steps", type=int, default=1000, help="classifier training steps")
    p.add_argument(
        "--reward",
        default=None,
        choices=["coverage", "classifier"],
        help="the imagined env's default reward recorded in the checkpoint (default: classifier if trained)",
    )
    p.add_argument("--no-progress", action="store_true")


@torch.no_grad()
def heldout_errors(model: DiffusionWorldModel, episodes, horizon: int = 8, seed: int = 0) -> dict[str, float]:
    """Mean absolute error per obs dim: one step (teacher-forced) and open loop after ``horizon`` steps."""
    cfg = model.config
    win = transition_windows(episodes, cfg.n_obs_steps, cfg.n_future)
    g = torch.Generator().manual_seed(seed)
    pred = model.predict_next(torch.from_numpy(win["obs"]), torch.from_numpy(win["act"]), generator=g)
    one = (pred - torch.from_numpy(win["next"])).abs().mean((0, 1))
    h = horizon - horizon % cfg.n_future
    long_eps = [(s, a) for s, a in episodes if len(s) > h]
    out = {f"one_step_mae_dim{i}": float(v) for i, v in enumerate(one)}
    if long_eps and h:
        s0 = torch.from_numpy(np.stack([np.repeat(s[:1], cfg.n_obs_steps, 0) for s, _ in long_eps]))
        acts = torch.from_numpy(np.stack([a[:h] for _, a in long_eps]))
        roll = model.rollout(s0, acts, generator=g)[:, -1]
        err = (roll - torch.from_numpy(np.stack([s[h] for s, _ in long_eps]))).abs().mean(0)
        out.update({f"open_loop_{h}_mae_dim{i}": float(v) for i, v in enumerate(err)})
    return out


def train_classifier_head(args: argparse.Namespace, obs_key: str, n_eps: int, ckpt) -> dict:
    """The success classifier on the training episodes' labelled states, AUROC on the held-out ones; saved
    into ``ckpt`` with the reward choice. Returns its record."""
    n_train = n_eps - args.holdout
    kw = {"tail": args.success_tail, "key": args.success_key, "threshold": args.success_threshold}
    x, y = success_labels(args.data, obs_key, episodes=range(n_train), **kw)
    clf = train_success_classifier(x, y, steps=args.success_steps, seed=args.seed)
    info = {
        "labels": f"per-step {args.success_key} >= {args.success_threshold}"
        if args.success_key
        else f"episode success flags, last {args.success_tail} steps of a success = 1",
        "n_train_states": int(len(y)),
        "n_train_positive": int(y.sum()),
        "train_auroc": auroc(clf.reward(x)[0], y),
    }
    try:
        hx, hy = success_labels(args.data, obs_key, episodes=range(n_train, n_eps), **kw)
        info.update(heldout_auroc=auroc(clf.reward(hx)[0], hy), n_heldout_states=int(len(hy)))
    except VlaflowError as e:  # held-out episodes with one class only (or no flags): no held-out AUROC
        info["heldout_auroc"] = None
        info["heldout_note"] = str(e)
    choice = args.reward or "classifier"
    save_success_classifier(ckpt, clf, info, reward=choice)
    return {"reward": choice, "classifier": info, "checkpoint": str(ckpt)}


def run_train_wm(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    cfg = PRESETS[args.preset]
    changes = {
        k: v
        for k, v in {
            "n_obs_steps": args.n_obs_steps,
            "n_future": args.n_future,
            "action_encoding": args.action_encoding,
        }.items()
        if v
    }
    cfg = cfg.replace(**changes)
    eps = episodes_from_store(args.data, cfg.obs_key, cfg.action_key)
    if args.holdout >= len(eps):
        raise VlaflowError(f"--holdout {args.holdout} leaves no training episodes of {len(eps)}")
    train_eps, held = eps[: len(eps) - args.holdout], eps[len(eps) - args.holdout :]
    if train_eps[0][0].shape[1] != cfg.obs_dim or train_eps[0][1].shape[1] != cfg.action_dim:
        raise VlaflowError(
            f"{args.data}: {cfg.obs_key} / {cfg.action_key} have dims {train_eps[0][0].shape[1]} / "
            f"{train_eps[0][1].shape[1]}; preset {args.preset!r} expects {cfg.obs_dim} / {cfg.action_dim}"
        )
    windows = transition_windows(train_eps, cfg.n_obs_steps, cfg.n_future)
    model = DiffusionWorldModel(cfg, fit_normalizer(cfg, windows))
    loop_cfg = LoopConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        grad_clip=1.0,
        seed=args.seed,
        workers=1,
        max_seconds=args.max_minutes * 60,
        log_every=max(1, min(100, args.steps // 20)),
        ckpt_every=max(1, args.steps // 5),
        device="cpu",
        num_threads=max(1, args.threads),
        progress=not args.no_progress,
        desc="train-wm",
    )
    run_config = {
        "world_model": cfg.to_dict(),
        "train_wm": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        "holdout": args.holdout,
    }
    meta = RunMeta(
        config=run_config,
        resumable=frozenset({"train_wm.steps"}),
        data={"location": P.data_location(args.data), "n_windows": int(len(windows["obs"]))},
        title=f"world model {args.preset}",
        provenance=P.invocation(args.data),
    )
    loop = TrainingLoop(loop_cfg, args.out, resume=args.resume)
    res = loop.run(WorldModelObjective(model, windows, args.batch_size, args.seed), meta=meta)
    trained = load_world_model(res.last_ckpt)
    reward = {"reward": args.reward or "coverage"}
    if args.success_classifier:
        reward = train_classifier_head(args, cfg.obs_key, len(eps), res.last_ckpt)
    elif args.reward == "classifier":
        raise VlaflowError("--reward classifier needs --success-classifier")
    summary = {
        "steps": res.step,
        "stopped": res.stopped,
        "train_seconds": res.train_seconds,
        "n_train_episodes": len(train_eps),
        "n_heldout_episodes": len(held),
        "checkpoint": str(res.last_ckpt),
        "heldout": heldout_errors(trained, held) if held else {},
        "imagined_reward": reward,
    }
    (Path(args.out) / "world_model.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
