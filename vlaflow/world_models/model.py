"""A diffusion world model over low-dim observations: one more user of the denoising contract.

Shapes: B batch, To past observations, Tf predicted next observations, Do obs dim, Da action dim,
Nb two-hot bins, T rollout length.

Timing (``s_t`` observation at step t, ``a_t`` the action executed at t)::

    condition: s_{t-To+1} .. s_t  (window, padded with the first obs at an episode start)
               a_t .. a_{t+Tf-1}  (two-hot per dimension, or continuous)
    target:    s_{t+1} .. s_{t+Tf}  (as deltas s_{t+k} - s_t when predict_delta; angles wrapped to (-pi, pi])

It is a :class:`~vlaflow.policies.denoising.DenoisingModel` whose target key is ``wm.target`` (B, Tf, Do)
and whose condition is one token [normalized window ; sin/cos of angle dims ; encoded actions]; the head is
a shared one (:func:`~vlaflow.policies.denoising.make_head`), the path :class:`~vlaflow.world_models.edm.
EDMPath`, the prediction EDM-preconditioned (:func:`~vlaflow.world_models.edm.edm_coefficients`), sampling
the existing samplers (Euler, ~3 steps, DIAMOND). Nothing is forked: ``denoise``/``generate`` are the
contract's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.denoising import DenoisingModel, make_head
from vlaflow.world_models.config import WorldModelConfig
from vlaflow.world_models.edm import EDMPath, edm_coefficients
from vlaflow.world_models.twohot import two_hot_encode, uniform_bins


def wrap_angle(x: Tensor) -> Tensor:
    """Into (-pi, pi]."""
    return x - 2 * math.pi * torch.ceil((x - math.pi) / (2 * math.pi))


def normalizer_modes(cfg: WorldModelConfig) -> dict[str, str]:
    return {cfg.obs_key: "meanstd", cfg.action_key: "minmax", cfg.target_key: "meanstd"}


class DiffusionWorldModel(DenoisingModel):
    """p(s_{t+1..t+Tf} | s_{t-To+1..t}, a_{t..t+Tf-1}); see the module doc."""

    parameterization = "x0"  # the preconditioned D(x_t) is the x0 estimate
    checkpoint_format = "vlaflow.world_model"  # what policies.checkpoint.write_checkpoint_files records

    def __init__(self, config: WorldModelConfig, normalizer: Normalizer):
        cfg = config
        super().__init__(
            cfg, target_key=cfg.target_key, target_shape=(cfg.n_future, cfg.obs_dim), normalizer=normalizer
        )
        self.register_buffer("bins", uniform_bins(cfg.action_dim, cfg.n_bins), persistent=False)
        a_width = cfg.action_dim * (cfg.n_bins if cfg.action_encoding == "two_hot" else 1)
        self.cond_dim = cfg.n_obs_steps * (cfg.obs_dim + 2 * len(cfg.angle_dims)) + cfg.n_future * a_width
        self.head = make_head(cfg.net, self.target_shape, self.cond_dim, 1)
        # the range of the data the model was trained on (raw units), for out-of-range detection
        st = normalizer.stats[cfg.obs_key]
        self.register_buffer("obs_min", torch.as_tensor(np.asarray(st["min"]), dtype=torch.float32))
        self.register_buffer("obs_max", torch.as_tensor(np.asarray(st["max"]), dtype=torch.float32))

    # -- family hooks ------------------------------------------------------------------------------
    def make_path(self) -> EDMPath:
        c = self.config
        return EDMPath(c.sigma_min, c.sigma_max, c.rho, c.p_mean, c.p_std)

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        return self.path.sample_train_time(batch_size, device)

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return x0

    def loss_weight(self, t: Tensor) -> Tensor:
        return edm_coefficients(self.path.alpha(t), self.path.sigma(t), self.config.sigma_data).weight

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The EDM-preconditioned x0 estimate D(x_t) (B, Tf, Do)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        c = edm_coefficients(self.path.alpha(t), self.path.sigma(t), self.config.sigma_data)
        v = (-1, 1, 1)
        f = self.head(
            c.c_in.view(v) * x_t,
            c.c_noise * self.config.time_scale,
            cond.flatten(1) if self.head.flat_cond else cond,
        )
        return c.c_skip.view(v) * x_t + c.c_out.view(v) * f

    # -- condition ---------------------------------------------------------------------------------
    def _check_input(self, batch: dict[str, Any], key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in batch:
            raise VlaflowError(
                f"world model ({self.config.task or 'no task'}) needs {key!r}; "
                f"got keys {sorted(map(str, batch))}"
            )
        x = torch.as_tensor(batch[key], device=self.device).float()
        if tuple(x.shape[1:]) != shape:
            raise VlaflowError(
                f"world model ({self.config.task or 'no task'}): {key!r} has shape {tuple(x.shape)}, it was "
                f"trained on (B, {', '.join(map(str, shape))})"
            )
        return x

    def encode(self, obs: dict[str, Any]) -> Tensor:
        cfg = self.config
        win = self._check_input(obs, cfg.obs_key, (cfg.n_obs_steps, cfg.obs_dim))  # (B, To, Do)
        act = self._check_input(obs, cfg.action_key, (cfg.n_future, cfg.action_dim))  # (B, Tf, Da)
        parts = [self.normalizer.normalize(cfg.obs_key, win).flatten(1)]
        if cfg.angle_dims:
            ang = win[..., list(cfg.angle_dims)]
            parts += [torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)]
        a = self.normalizer.normalize(cfg.action_key, act)
        if cfg.action_encoding == "two_hot":
            a = two_hot_encode(a, self.bins)  # (B, Tf, Da, Nb)
        parts.append(a.flatten(1))
        return torch.cat(parts, -1).unsqueeze(1)  # (B, 1, cond_dim)

    # -- targets -----------------------------------------------------------------------------------
    def target_from(self, window: Tensor, next_obs: Tensor) -> Tensor:
        """Raw (B, Tf, Do) next observations -> the model's target (deltas from the last obs, wrapped)."""
        if not self.config.predict_delta:
            return next_obs
        d = next_obs - window[:, -1:, :]
        if self.config.angle_dims:
            idx = list(self.config.angle_dims)
            d[..., idx] = wrap_angle(d[..., idx])
        return d

    def next_from(self, window: Tensor, target: Tensor) -> Tensor:
        nxt = target + window[:, -1:, :] if self.config.predict_delta else target.clone()
        if self.config.angle_dims:
            idx = list(self.config.angle_dims)
            nxt[..., idx] = torch.remainder(nxt[..., idx], 2 * math.pi)
        return nxt

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        win = self._check_input(batch, cfg.obs_key, (cfg.n_obs_steps, cfg.obs_dim))
        nxt = self._check_input(batch, cfg.next_key, (cfg.n_future, cfg.obs_dim))
        return super().compute_loss({**batch, cfg.target_key: self.target_from(win, nxt)})

    # -- prediction --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_next(
        self,
        window: Tensor,
        actions: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """One model call: raw window (B, To, Do) + actions (B, Tf, Da) -> raw next obs (B, Tf, Do)."""
        cfg = self.config
        window = torch.as_tensor(window, dtype=torch.float32, device=self.device)
        gen = self.generate(
            {cfg.obs_key: window, cfg.action_key: torch.as_tensor(actions, dtype=torch.float32)},
            noise=noise,
            num_steps=num_steps,
            generator=generator,
        )
        return self.next_from(window, gen.actions)

    @torch.no_grad()
    def rollout(self, window: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Autoregressive open-loop rollout: window (B, To, Do), actions (B, T, Da) with T a multiple of Tf
        -> predicted observations (B, T, Do) (T / Tf model calls, each fed its own predictions)."""
        tf = self.config.n_future
        if actions.shape[1] % tf:
            raise VlaflowError(f"rollout of {actions.shape[1]} actions is not a multiple of n_future={tf}")
        win = torch.as_tensor(window, dtype=torch.float32, device=self.device)
        out = []
        for k in range(0, actions.shape[1], tf):
            nxt = self.predict_next(win, actions[:, k : k + tf], generator)
            out.append(nxt)
            win = torch.cat([win, nxt], 1)[:, -self.config.n_obs_steps :]
        return torch.cat(out, 1)
