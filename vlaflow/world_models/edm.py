"""EDM preconditioning (Karras et al., 2022) on top of the Gaussian path ``x_t = alpha x0 + sigma eps``.

EDM's variable is ``x = x0 + s n`` with noise level ``s``; on any path it is ``x = x_t / alpha`` with
``s = sigma / alpha``. The denoiser (the x0 estimate) is

    D(x_t) = c_skip * x_t + c_out * F(c_in * x_t, c_noise)

with, for data std ``sd`` (``s2 = s^2 + sd^2``):

    c_skip = sd^2 / s2 / alpha      c_out = s * sd / sqrt(s2)      c_in = 1 / sqrt(s2) / alpha
    c_noise = ln(s) / 4             loss weight lambda = 1 / c_out^2 on |D - x0|^2

(the ``1 / alpha`` factors move EDM's ``x`` to our ``x_t``). Limits, tested in tests/test_world_models.py:

- ``s -> 0`` (clean end): c_skip -> 1/alpha, c_out -> 0: D = x_t / alpha, the identity on clean data;
- ``s -> inf`` (pure noise): c_skip -> 0, c_out -> sd: D = sd * F, plain x0-prediction of the network;
- ``sd = 1`` on a variance-preserving path (alpha^2 + sigma^2 = 1): c_in = 1 (the network reads x_t as is)
  and D = alpha x_t + sigma F, which is exactly Salimans & Ho's v-parameterisation with v = -F
  (:func:`vlaflow.policies.conversions.x0_eps_from_v`).

:class:`EDMPath` is EDM's own path (alpha = 1, sigma = t, log-normal training noise, Karras' rho grid) in
the :class:`~vlaflow.policies.path.GaussianPath` description, so the existing samplers (Euler, Heun, DDIM)
run on it unchanged; DIAMOND samples its world model with ~3 Euler steps on this grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlaflow.errors import VlaflowError


@dataclass(frozen=True)
class EDMCoefficients:
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor
    weight: Tensor  # lambda(s) = 1 / c_out^2: the EDM loss weight on |D - x0|^2


def edm_coefficients(alpha, sigma, sigma_data: float = 1.0) -> EDMCoefficients:
    """The preconditioning at path coefficients (alpha, sigma) (broadcasting tensors); see the module doc."""
    a = torch.as_tensor(alpha, dtype=torch.float32)
    s = torch.as_tensor(sigma, dtype=torch.float32) / a  # EDM noise level
    sd2 = sigma_data * sigma_data
    s2 = s * s + sd2
    c_out = s * sigma_data / s2.sqrt()
    return EDMCoefficients(
        c_skip=sd2 / s2 / a,
        c_out=c_out,
        c_in=1.0 / s2.sqrt() / a,
        c_noise=torch.log(s.clamp(min=1e-12)) / 4.0,
        weight=1.0 / (c_out * c_out).clamp(min=1e-12),
    )


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras' grid ``(s_max^(1/rho) + i/(K-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, i = 0..K-1, then 0."""
    if num_steps < 1:
        raise VlaflowError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0])
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + i * (lo - hi)) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@dataclass(frozen=True)
class EDMPath:
    """EDM's path in our description: ``x_t = x0 + t eps`` (alpha = 1, sigma = t), t = 0 is the data."""

    sigma_min: float = 0.002  # smallest noise level of the sampling grid (DIAMOND: 2e-3)
    sigma_max: float = 5.0  # largest (DIAMOND: 5; data is normalized to ~unit std)
    rho: float = 7.0  # Karras' grid curvature
    p_mean: float = -0.4  # training: ln sigma ~ N(p_mean, p_std^2) (DIAMOND's values)
    p_std: float = 1.2
    kind: str = field(default="edm", init=False)

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise VlaflowError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.p_std <= 0 or self.rho <= 0:
            raise VlaflowError(f"p_std and rho must be > 0, got {self.p_std}, {self.rho}")

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float32))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32).clone()

    def timesteps(self, num_steps: int) -> Tensor:
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)

    def model_time(self, t: Tensor) -> Tensor:
        """c_noise = ln(sigma) / 4 (EDM), the network's time input."""
        return torch.log(torch.as_tensor(t, dtype=torch.float32).clamp(min=1e-12)) / 4.0

    def time_for_snr(self, snr: Tensor) -> Tensor:
        return 1.0 / torch.as_tensor(snr, dtype=torch.float32)

    def sample_train_time(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(batch, generator=generator, device=device)
        return torch.exp(self.p_mean + self.p_std * z)
