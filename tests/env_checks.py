"""The env-interface checks every vectorized chunk env passes (the sim's SubprocChunkEnv, the imagined env):
what :class:`vlaflow.rl.rollout.ChunkVecEnv` promises and :func:`vlaflow.rl.rollout.collect` relies on."""

from __future__ import annotations

import numpy as np
import pytest

from vlaflow.errors import VlaflowError


def check_chunk_vec_env(
    venv, obs_key: str, obs_dim: int, to: int, ta: int, da: int, low, high, max_chunks=40
):
    """Run ``venv`` (N envs) through reset / step until every episode ended (at most ``max_chunks``)."""
    n = venv.n_envs
    assert isinstance(n, int) and n >= 1 and venv.env_steps >= 0
    seeds = list(range(3, 3 + n))
    obs = venv.reset(seeds)
    assert (
        set(obs) >= {obs_key} and obs[obs_key].shape == (n, to, obs_dim) and obs[obs_key].dtype == np.float32
    )
    assert np.isfinite(obs[obs_key]).all()
    assert all(
        np.array_equal(obs[obs_key][:, 0], obs[obs_key][:, i]) for i in range(to)
    )  # padded with the first
    again = venv.reset(seeds)
    assert np.array_equal(again[obs_key], obs[obs_key])  # a seed fixes the start
    with pytest.raises(VlaflowError, match="seeds"):
        venv.reset(seeds[:-1])
    venv.reset(seeds)
    rng = np.random.default_rng(0)
    ended_at = np.full(n, -1)
    prev_last = obs[obs_key][:, -1]
    for c in range(max_chunks):
        chunk = rng.uniform(low, high, (n, ta, da))
        obs, reward, done, success = venv.step(chunk)
        assert obs[obs_key].shape == (n, to, obs_dim) and np.isfinite(obs[obs_key]).all()
        assert reward.shape == (n,) and np.isfinite(reward).all()
        assert done.shape == (n,) and done.dtype == bool and success.shape == (n,) and success.dtype == bool
        stepped = ended_at < 0
        if to >= 2 and ta == 1:
            assert np.allclose(obs[obs_key][stepped, -2], prev_last[stepped])  # the window shifted by one
        assert (reward[~stepped] == 0).all() and done[~stepped].all()  # ended envs ignore their chunk
        ended_at[stepped & done] = c
        prev_last = obs[obs_key][:, -1]
        if done.all():
            break
    assert (ended_at >= 0).all(), "an episode never ended (no horizon cap?)"
    return ended_at
