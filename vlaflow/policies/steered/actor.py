"""DSRL's noise actor: obs features (B, Fo) -> bounded initial noise (B, Dw) for a frozen denoiser.

Here (not in ``vlaflow.rl``) because a refined checkpoint's policy runs it at inference; SAC in
:mod:`vlaflow.rl.dsrl` trains it. The bound is applied once, by a tanh, and the log-density carries the
tanh and scale Jacobians.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlaflow.policies.nets.mlp import mish_mlp

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


mlp = mish_mlp  # one definition: vlaflow.policies.nets.mlp


class NoiseActor(nn.Module):
    """obs features (B, Fo) -> noise (B, Dw) in [-bound, bound] and its log-density (B,)."""

    def __init__(self, obs_dim: int, noise_dim: int, bound: float = 1.5, width: int = 256):
        super().__init__()
        self.bound, self.noise_dim = float(bound), int(noise_dim)
        self.body = mlp(obs_dim, 2 * noise_dim, width, 2)
        nn.init.zeros_(self.body[-1].weight)  # starts at zero-mean noise: plain sampling of the base policy
        nn.init.zeros_(self.body[-1].bias)

    def forward(
        self, obs: Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        mu, log_std = self.body(obs).chunk(2, -1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        if deterministic:
            u = mu
        else:
            z = torch.randn(mu.shape, generator=generator, device=mu.device)
            u = mu + log_std.exp() * z
        w = self.bound * torch.tanh(u)
        # log N(u; mu, std) - sum log(bound * (1 - tanh(u)^2)), the latter in a stable form
        lp = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        lp = lp - (math.log(self.bound) + 2 * (math.log(2.0) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return w, lp
