"""Transition windows for world-model training, from episodes (arrays) or an episode store, and the fit.

Shapes: N windows, E episodes, T steps of one episode, To / Tf / Do / Da as in :mod:`.model`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlaflow.data.normalize import Normalizer
from vlaflow.data.store import EpisodeStore
from vlaflow.errors import VlaflowError
from vlaflow.world_models.config import WorldModelConfig
from vlaflow.world_models.model import DiffusionWorldModel, normalizer_modes

Episode = tuple[np.ndarray, np.ndarray]  # (states (T, Do), actions (T, Da)); a_t moves s_t to s_{t+1}


def episodes_from_store(
    path: str | os.PathLike, obs_key: str, action_key: str, episodes: Sequence[int] | None = None
) -> list[Episode]:
    with EpisodeStore.open(path) as store:
        idx = range(store.n_episodes) if episodes is None else episodes
        out = []
        for i in idx:
            ep = store.get_episode(int(i), [obs_key, action_key])
            out.append((np.asarray(ep[obs_key], np.float32), np.asarray(ep[action_key], np.float32)))
    return out


def success_labels(
    path: str | os.PathLike,
    obs_key: str,
    *,
    episodes: Sequence[int] | None = None,
    tail: int = 10,
    key: str | None = None,
    threshold: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, Do) states and (N,) 0/1 labels for the success classifier, from a store.

    With ``key`` (a per-step reward or success array in the store): label = value >= ``threshold``, every
    step. Without: the store's episode success flags (World4RL's labelling of whole episodes): the last
    ``tail`` states of a successful episode are 1, every state of an unsuccessful episode is 0, and the
    states of a successful episode before its last ``2 * tail`` steps are 0 too (not yet a success); the
    ``tail`` states between are left out (the boundary is not known per step). Episodes of unknown success
    are left out."""
    if tail < 1:
        raise VlaflowError(f"tail must be >= 1, got {tail}")
    xs, ys = [], []
    with EpisodeStore.open(path) as store:
        idx = range(store.n_episodes) if episodes is None else episodes
        if key is not None and key not in store.keys:
            raise VlaflowError(
                f"{path}: no per-step key {key!r} for success labels; it has {sorted(store.keys)}"
            )
        for i in idx:
            ep = store.get_episode(int(i), [obs_key] + ([key] if key else []))
            s = np.asarray(ep[obs_key], np.float32)
            if key is not None:
                xs.append(s)
                ys.append(np.asarray(ep[key], np.float64).reshape(len(s), -1)[:, 0] >= threshold)
                continue
            ok = store.episode_meta(int(i))["success"]
            if ok is None:
                continue
            if not ok:
                xs.append(s)
                ys.append(np.zeros(len(s), bool))
                continue
            early = s[: max(len(s) - 2 * tail, 0)]
            xs += [s[-tail:], early]
            ys += [np.ones(len(s[-tail:]), bool), np.zeros(len(early), bool)]
    if not xs:
        raise VlaflowError(
            f"{path}: no episode has a success flag (a raw diffusion_policy store has none); give a per-step "
            "key (reward or success) instead"
        )
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.float32)
    if y.min() == y.max():
        raise VlaflowError(
            f"{path}: success labels are all {int(y[0])} ({len(y)} states); the classifier needs both "
            "successful and unsuccessful states"
        )
    return x, y


def episode_starts(episodes: Sequence[Episode]) -> np.ndarray:
    """(E, Do) the first observation of every episode: where imagined episodes start."""
    return np.stack([s[0] for s, _ in episodes]).astype(np.float32)


def transition_windows(episodes: Sequence[Episode], n_obs_steps: int, n_future: int) -> dict[str, np.ndarray]:
    """Every (window, actions, next) of the episodes: ``obs`` (N, To, Do) padded with the first obs at an
    episode start, ``act`` (N, Tf, Da) = a_t..a_{t+Tf-1}, ``next`` (N, Tf, Do) = s_{t+1}..s_{t+Tf}."""
    obs, act, nxt = [], [], []
    for states, actions in episodes:
        t_len = len(states)
        if len(actions) != t_len:
            raise VlaflowError(f"an episode has {t_len} states but {len(actions)} actions")
        pad = np.concatenate([np.repeat(states[:1], n_obs_steps - 1, 0), states])  # (To - 1 + T, Do)
        for t in range(t_len - n_future):
            obs.append(pad[t : t + n_obs_steps])
            act.append(actions[t : t + n_future])
            nxt.append(states[t + 1 : t + 1 + n_future])
    if not obs:
        raise VlaflowError(f"no episode is longer than n_future={n_future} steps")
    return {"obs": np.stack(obs), "act": np.stack(act), "next": np.stack(nxt)}


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "q01": np.quantile(x, 0.01, 0),
        "q99": np.quantile(x, 0.99, 0),
    }


def fit_normalizer(cfg: WorldModelConfig, windows: dict[str, np.ndarray]) -> Normalizer:
    """Statistics of observations, actions and the model's target (deltas with wrapped angles)."""
    tgt = windows["next"] - windows["obs"][:, -1:] if cfg.predict_delta else windows["next"].copy()
    for d in cfg.angle_dims if cfg.predict_delta else ():
        tgt[..., d] = tgt[..., d] - 2 * math.pi * np.ceil((tgt[..., d] - math.pi) / (2 * math.pi))
    stats = {
        cfg.obs_key: _stats(windows["obs"]),
        cfg.action_key: _stats(windows["act"]),
        cfg.target_key: _stats(tgt),
    }
    return Normalizer(stats, normalizer_modes(cfg))


def batch_of(
    cfg: WorldModelConfig, windows: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, torch.Tensor]:
    return {
        cfg.obs_key: torch.from_numpy(windows["obs"][idx]),
        cfg.action_key: torch.from_numpy(windows["act"][idx]),
        cfg.next_key: torch.from_numpy(windows["next"][idx]),
    }


def train_world_model(
    cfg: WorldModelConfig,
    windows: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    max_seconds: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
    model: DiffusionWorldModel | None = None,
    log_every: int = 0,
) -> tuple[DiffusionWorldModel, list[dict]]:
    """Adam on the EDM loss for ``steps`` minibatches or ``max_seconds``, whichever comes first (bounded by
    design: long runs belong to ``vlaflow train-wm``); ``clock`` measures them (``time.process_time``: this
    process's CPU seconds, a budget other processes' load does not shrink). Returns the model (eval mode) and
    the loss curve."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model or DiffusionWorldModel(cfg, fit_normalizer(cfg, windows))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
    n = len(windows["obs"])
    hist, t0 = [], clock()
    for step in range(steps):
        loss, metrics = model.compute_loss(batch_of(cfg, windows, rng.integers(0, n, batch_size)))
        if not torch.isfinite(loss):
            raise VlaflowError(f"world-model loss is {float(loss)} at step {step}; stopped")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            hist.append({"step": step, "loss": metrics["loss"], "seconds": clock() - t0})
        if clock() - t0 > max_seconds:
            if log_every:
                hist.append({"step": step, "loss": metrics["loss"], "seconds": clock() - t0})
            break
    return model.eval(), hist
