"""The imagined env: a frozen world model behind the RL's vectorized chunk-env protocol.

Shapes: N parallel imagined episodes, M samples per episode for the uncertainty signal, To the policy's
obs window, Ta executed steps per chunk, Tf the model's steps per call, Do / Da obs / action dims.

:class:`WorldModelEnv` implements :class:`vlaflow.rl.rollout.ChunkVecEnv`, so :func:`vlaflow.rl.rollout.
collect` and DPPO run on it unchanged. ``reset(seeds)`` starts episode j from real observation
``starts[seed_j % E]`` (recorded episode starts from a store: :func:`vlaflow.world_models.data.
episode_starts`), its window padded with that first observation like the sim's. ``step(chunks)`` runs the N
episodes (times M samples) through the model in one batched forward per model call (Ta / Tf calls per
chunk); the first sample is the next state, the std of the M samples (in the model's normalized obs units,
averaged over dims) is the episode's ``uncertainty``, which RL can penalise (``uncertainty_penalty``).

An episode ends on success (when ``terminate_on_success``), at the horizon cap ``max_steps``, or when a
predicted state is NaN / inf or leaves the training data's range by more than ``range_margin`` times that
range: then ``invalid`` is set for it, the bad state is not fed back (the window keeps the last valid one)
and that step earns no reward. ``last_info`` holds the last step's ``uncertainty`` (N,), ``invalid`` (N,)
and the episodes' ``invalid`` flags so far. ``derive`` adds observation keys that are functions of the
predicted state (PushT's keypoints and agent position: :data:`vlaflow.sim.imagined.DERIVED_KEYS`, passed
in by the caller, since this layer knows no simulator). ``env_steps`` counts real env steps and stays 0
(nothing real is touched); ``imagined_steps`` counts the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlaflow.errors import VlaflowError
from vlaflow.world_models.model import DiffusionWorldModel
from vlaflow.world_models.reward import RewardFn


class WorldModelEnv:
    """N imagined episodes stepped a chunk at a time; see the module doc."""

    def __init__(
        self,
        model: DiffusionWorldModel,
        starts: np.ndarray,
        n_envs: int,
        n_obs_steps: int,
        reward_fn: RewardFn,
        *,
        max_steps: int = 300,
        n_samples: int = 2,
        uncertainty_penalty: float = 0.0,
        range_margin: float = 0.1,
        terminate_on_success: bool = True,
        seed: int = 0,
        derive: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    ):
        cfg = model.config
        starts = np.asarray(starts, np.float32)
        if starts.ndim != 2 or starts.shape[1] != cfg.obs_dim or len(starts) == 0:
            raise VlaflowError(
                f"starts must be (E, {cfg.obs_dim}) observations of {cfg.obs_key!r}, got {starts.shape}"
            )
        if n_envs < 1 or n_obs_steps < 1 or n_samples < 1 or max_steps < 1:
            raise VlaflowError(f"need n_envs, n_obs_steps, n_samples, max_steps >= 1: {n_envs, n_obs_steps}")
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.starts = starts
        self.n_envs, self.to = n_envs, n_obs_steps
        self.reward_fn = reward_fn
        self.max_steps, self.n_samples = max_steps, n_samples
        self.uncertainty_penalty, self.range_margin = uncertainty_penalty, range_margin
        self.terminate_on_success = terminate_on_success
        self.obs_key = cfg.obs_key
        self.derive = derive  # (N, To, Do) windows -> the task's other keys that are functions of the state
        self.env_steps = 0  # real env steps: none, ever
        self.imagined_steps = 0  # model steps (all envs)
        self.model_calls = 0  # batched forwards of the sampler (each is num_inference_steps evaluations)
        self._gen = torch.Generator(device=model.device).manual_seed(seed)
        span = (model.obs_max - model.obs_min).cpu()
        self._lo = (model.obs_min.cpu() - range_margin * span).numpy()
        self._hi = (model.obs_max.cpu() + range_margin * span).numpy()
        self._hist_len = max(cfg.n_obs_steps, n_obs_steps)
        self._hist = np.zeros((n_envs, self._hist_len, cfg.obs_dim), np.float32)
        self.done = np.ones(n_envs, bool)
        self.success = np.zeros(n_envs, bool)
        self.invalid = np.zeros(n_envs, bool)
        self.t = np.zeros(n_envs, int)
        self.last_info: dict[str, np.ndarray] = {}

    def _obs(self) -> dict[str, np.ndarray]:
        w = self._hist[:, -self.to :].copy()
        return {self.obs_key: w, **(self.derive(w) if self.derive is not None else {})}

    def reset(
        self, seeds: Sequence[int], starts: np.ndarray | None = None, noise_seed: int | None = None
    ) -> dict[str, np.ndarray]:
        """Start the N episodes from ``starts`` (N, Do) when given (e.g. real env resets with these seeds),
        else from ``self.starts[seed % E]``; ``noise_seed`` re-seeds the sampler's noise (None: runs on)."""
        if len(seeds) != self.n_envs:
            raise VlaflowError(f"reset needs {self.n_envs} seeds, got {len(seeds)}")
        if starts is None:
            first = self.starts[np.asarray(seeds, np.int64) % len(self.starts)]  # (N, Do)
        else:
            first = np.asarray(starts, np.float32)
            if first.shape != (self.n_envs, self.cfg.obs_dim):
                raise VlaflowError(
                    f"starts must be ({self.n_envs}, {self.cfg.obs_dim}) observations of {self.obs_key!r}, "
                    f"got {first.shape}"
                )
        if noise_seed is not None:
            self._gen.manual_seed(int(noise_seed))
        self._hist[:] = first[:, None, :]
        self.done[:] = False
        self.success[:] = False
        self.invalid[:] = False
        self.t[:] = 0
        self.last_info = {}
        return self._obs()

    @torch.no_grad()
    def _predict(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """actions (N, Tf, Da) -> next states (N, Tf, Do) (first sample) and uncertainty (N,)."""
        n, m, dev = self.n_envs, self.n_samples, self.model.device
        win = torch.from_numpy(self._hist[:, -self.cfg.n_obs_steps :]).to(dev).repeat_interleave(m, 0)
        act = torch.from_numpy(np.ascontiguousarray(actions, np.float32)).to(dev).repeat_interleave(m, 0)
        nxt = self.model.predict_next(win, act, generator=self._gen)  # (N * M, Tf, Do)
        self.model_calls += 1
        nxt = nxt.view(n, m, *nxt.shape[1:])
        unc = torch.zeros(n, device=dev)
        if m > 1:
            z = self.model.normalizer.normalize(self.cfg.obs_key, nxt)
            unc = z.std(1).mean((-1, -2))
        return nxt[:, 0].cpu().numpy(), unc.cpu().numpy()

    def step(self, chunks: np.ndarray):
        cfg = self.cfg
        chunks = np.asarray(chunks, np.float32)
        n = self.n_envs
        if chunks.ndim != 3 or chunks.shape[0] != n or chunks.shape[2] != cfg.action_dim:
            raise VlaflowError(f"chunks must be ({n}, Ta, {cfg.action_dim}) actions, got {chunks.shape}")
        ta, tf = chunks.shape[1], cfg.n_future
        if ta % tf:
            raise VlaflowError(f"the world model predicts {tf} steps per call; Ta={ta} is not a multiple")
        reward = np.zeros(n)
        was_done = self.done.copy()
        step_invalid = np.zeros(n, bool)
        unc_sum = np.zeros(n)
        for k in range(0, ta, tf):
            if self.done.all():
                break
            nxt, unc = self._predict(chunks[:, k : k + tf])
            unc_sum += np.where(self.done, 0.0, unc)
            for j in range(tf):
                live = ~self.done
                s = nxt[:, j]
                bad = live & ~(np.isfinite(s).all(1) & (s >= self._lo).all(1) & (s <= self._hi).all(1))
                step_invalid |= bad
                self.invalid |= bad
                ok = live & ~bad
                r, succ = self.reward_fn(np.where(ok[:, None], s, self._hist[:, -1]))
                reward += np.where(ok, np.nan_to_num(r) - self.uncertainty_penalty * unc, 0.0)
                self.success |= ok & np.asarray(succ, bool)
                self._hist[ok] = np.concatenate([self._hist[ok, 1:], s[ok, None]], 1)
                self.t += ok
                self.imagined_steps += int(ok.sum())
                self.done |= bad | (self.t >= self.max_steps)
                if self.terminate_on_success:
                    self.done |= self.success
        reward[was_done] = 0.0
        self.last_info = {
            "uncertainty": unc_sum / max(ta // tf, 1),
            "invalid": step_invalid,
            "episode_invalid": self.invalid.copy(),
        }
        return self._obs(), reward, self.done.copy(), self.success.copy()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
