"""On-policy chunk rollouts through a vectorized env, with the denoising chain recorded.

Shapes: N envs, T decisions (chunks), To obs window, H chunk, Ta executed steps, K' recorded steps.

:class:`ChunkVecEnv` is what this layer needs of an environment: N episodes stepped a chunk at a time
(the sim harness implements it with worker processes, :class:`vlaflow.sim.rollout.SubprocChunkEnv`; an
imagined env can too). One call of :func:`collect` resets the N envs with the given seeds, then for T
decisions encodes the N obs windows in one batch, samples N chains (batched inference across envs),
executes chunk[0:Ta] in every env and records what PPO needs. An env whose episode ended stays ended (its
later decisions are masked out, ``alive`` = False) until the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from vlaflow.rl.chain import Chain, NoiseScale, sample_chain

TRAIN_SEEDS = (0, 100_000)  # per-episode training seeds come from [0, 100000)
EVAL_SEEDS = (100_000, 100_200)  # the held-out evaluation seeds (the first 50: the paper's)


def train_seeds(iteration: int, n_envs: int, offset: int = 0) -> list[int]:
    """The seeds of rollout ``iteration``'s N episodes: consecutive, wrapping inside [0, 100000), so
    training never sees an evaluation seed."""
    lo, hi = TRAIN_SEEDS
    return [lo + (offset + iteration * n_envs + j) % (hi - lo) for j in range(n_envs)]


class ChunkVecEnv(Protocol):
    """N episodes stepped one action chunk at a time; observations as windows {key: (N, To, ...)}."""

    n_envs: int
    env_steps: int  # real env steps executed so far, all envs together

    def reset(self, seeds: Sequence[int]) -> dict[str, np.ndarray]: ...

    def step(self, chunks: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """``chunks`` (N, Ta, Da) raw actions -> (obs windows, reward (N,) summed over the executed steps,
        done (N,) the episode ended (success, failure or step limit), success (N,) so far this episode).
        Envs already done ignore their chunk and return reward 0, done True."""
        ...

    def close(self) -> None: ...


def obs_to_torch(window: dict[str, np.ndarray], device) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in window.items()}


@torch.no_grad()
def collect(
    actor,
    frozen,
    chain: Chain,
    venv: ChunkVecEnv,
    seeds: Sequence[int],
    n_decisions: int,
    ta: int,
    generator: torch.Generator,
    value_fn=None,
    noise_scale: NoiseScale | None = None,
) -> dict[str, Tensor]:
    """One on-policy batch: dict of tensors with leading (T, N) (``last_value`` (N,)).

    obs.<key> (T, N, To, ...) windows; x_t / x_next (T, N, K', H, Da), t / t_next (K',), logp (T, N, K');
    reward / done / alive / success (T, N); value (T, N) when ``value_fn(obs) -> (N,)`` is given.
    """
    device = actor.device
    obs = venv.reset(seeds)
    n = venv.n_envs
    out: dict[str, list] = {}
    alive = np.ones(n, bool)

    def put(k, v):
        out.setdefault(k, []).append(v)

    t_rec = None
    for _ in range(n_decisions):
        ob = obs_to_torch(obs, device)
        cond = actor.encode(ob)
        x0, rec = sample_chain(actor, frozen, chain, cond, generator, noise_scale)
        actions = actor.unnormalize_target(x0)[:, :ta].cpu().numpy()  # (N, Ta, Da)
        for k, v in ob.items():
            put(k, v.cpu())
        put("x_t", rec["x_t"].cpu())
        put("x_next", rec["x_next"].cpu())
        put("logp", rec["logp"].cpu())
        t_rec = (rec["t"].cpu(), rec["t_next"].cpu())
        if value_fn is not None:
            put("value", value_fn(ob).cpu())
        put("alive", torch.from_numpy(alive.copy()))
        obs, reward, done, success = venv.step(actions)
        reward = np.where(alive, reward, 0.0)
        put("reward", torch.from_numpy(reward.astype(np.float32)))
        put("done", torch.from_numpy(done | ~alive))
        put("success", torch.from_numpy(np.asarray(success, bool)))
        alive = alive & ~done
    res = {k: torch.stack(v) for k, v in out.items()}
    res["t"], res["t_next"] = t_rec
    if value_fn is not None:
        res["last_value"] = value_fn(obs_to_torch(obs, device)).cpu()
    return res


def episode_stats(batch: dict[str, Tensor]) -> dict[str, float]:
    """Per-episode success rate, mean return (sum of chunk rewards) and env decisions of a collected batch."""
    success = batch["success"].any(0).float()
    ret = batch["reward"].sum(0)
    return {
        "rollout_success": float(success.mean()),
        "rollout_return": float(ret.mean()),
        "rollout_decisions": float(batch["alive"].float().sum()),
    }
