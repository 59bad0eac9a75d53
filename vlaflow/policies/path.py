"""Gaussian corruption paths ``x_t = alpha(t) * x0 + sigma(t) * eps`` shared by the denoising families.

Two instances, one description:

- :class:`VPCosinePath` — DDPM's variance-preserving path with the squared-cosine ("squaredcos_cap_v2")
  beta schedule over ``num_train_steps`` discrete steps, exactly as ``diffusers`` builds it. Time is the
  discrete step index ``k`` in ``0..N-1`` (a float tensor is accepted); ``k = -1`` is the clean end
  (alpha = 1, sigma = 0), which is what diffusers uses for the step after ``k = 0``.
- :class:`RectifiedFlowPath` — rectified flow in openpi/pi0's convention: ``alpha = 1 - t``, ``sigma = t``,
  ``t = 1`` is pure noise, ``t = 0`` the data.

Both expose ``alpha(t)``, ``sigma(t)``, ``timesteps(num_steps)`` (the sampler's time grid, noisy to clean,
ending at the clean time), ``model_time(t)`` (what the network's time embedding reads) and
``time_for_snr(snr)`` (the inverse of ``alpha / sigma``, used to move between paths at matched noise level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class GaussianPath(Protocol):
    """What samplers, conversions and composers need to know about a path."""

    kind: str

    def alpha(self, t: Tensor) -> Tensor: ...

    def sigma(self, t: Tensor) -> Tensor: ...

    def timesteps(self, num_steps: int) -> Tensor: ...

    def model_time(self, t: Tensor) -> Tensor: ...

    def time_for_snr(self, snr: Tensor) -> Tensor: ...


def squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """Betas of the improved-DDPM cosine schedule, computed like ``diffusers.betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _gather_interp(table: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation of ``table`` (indexed from time -1) at float times; exact at integers."""
    t = torch.as_tensor(t, dtype=torch.float32, device=table.device)
    pos = (t + 1.0).clamp(0, table.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = pos - lo.to(pos.dtype)
    return table[lo] * (1 - w) + table[hi] * w


@dataclass(frozen=True)
class VPCosinePath:
    """DDPM variance-preserving path, squared-cosine schedule, discrete time ``k`` in ``-1..N-1``."""

    num_train_steps: int = 100  # N: discrete diffusion steps used in training (Diffusion Policy: 100)
    kind: str = field(default="vp", init=False)

    def __post_init__(self):
        if self.num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {self.num_train_steps}")

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        """abar_k for k = 0..N-1, float32 cumulative product as diffusers computes it."""
        return torch.cumprod(1.0 - squaredcos_cap_v2_betas(self.num_train_steps), dim=0)

    @cached_property
    def _abar_cpu(self) -> Tensor:
        # Index 0 is k = -1 (clean: abar = 1), then k = 0..N-1.
        return torch.cat([torch.ones(1), self.alphas_cumprod])

    @cached_property
    def _abar_by_device(self) -> dict:
        return {}

    def _abar_table(self, device) -> Tensor:
        # cached per device: sampling on a GPU must not copy the table host-to-device at every step
        key = str(device)
        if key not in self._abar_by_device:
            self._abar_by_device[key] = self._abar_cpu.to(device)
        return self._abar_by_device[key]

    def alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        return _gather_interp(self._abar_table(t.device), t)

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self.alpha_bar(t)).clamp(min=0).sqrt()

    def timesteps(self, num_steps: int) -> Tensor:
        """diffusers' "leading" spacing: ``[(K-1)r, ..., r, 0]`` with ``r = N // K``, then -1 (clean)."""
        if not 1 <= num_steps <= self.num_train_steps:
            raise ValueError(f"num_steps must be in 1..{self.num_train_steps}, got {num_steps}")
        ratio = self.num_train_steps // num_steps
        ts = torch.arange(num_steps - 1, -1, -1, dtype=torch.float32) * ratio
        return torch.cat([ts, torch.tensor([-1.0])])

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32)

    def time_for_snr(self, snr: Tensor) -> Tensor:
        """Inverse of ``alpha/sigma`` on the piecewise-linear abar table; SNR is decreasing in k."""
        snr = torch.as_tensor(snr, dtype=torch.float32)
        abar_target = snr**2 / (1 + snr**2)
        table = self._abar_table(snr.device)  # decreasing in k
        # searchsorted needs ascending: flip.
        asc = table.flip(0)
        idx = torch.searchsorted(asc, abar_target.contiguous()).clamp(1, asc.numel() - 1)
        lo_v, hi_v = asc[idx - 1], asc[idx]
        w = ((abar_target - lo_v) / (hi_v - lo_v).clamp(min=1e-12)).clamp(0, 1)
        pos_asc = (idx - 1).to(torch.float32) + w
        pos = (asc.numel() - 1) - pos_asc
        return pos - 1.0


@dataclass(frozen=True)
class RectifiedFlowPath:
    """Rectified flow, pi0 convention: ``x_t = (1 - t) x0 + t eps``, t = 1 noise, t = 0 data."""

    time_scale: float = 100.0  # the network's time embedding reads t * time_scale (same range as VP's 0..N)
    kind: str = field(default="flow", init=False)

    def __post_init__(self):
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.as_tensor(t, dtype=torch.float32)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32).clone()

    def timesteps(self, num_steps: int) -> Tensor:
        """Uniform grid from t = 1 (noise) to t = 0 (data), ``num_steps + 1`` points."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def model_time(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * self.time_scale

    def time_for_snr(self, snr: Tensor) -> Tensor:
        # (1 - t) / t = snr  ->  t = 1 / (1 + snr)
        return 1.0 / (1.0 + torch.as_tensor(snr, dtype=torch.float32))


def pi0_train_time(
    batch: int,
    beta_a: float = 1.5,
    beta_b: float = 1.0,
    t_min: float = 0.001,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """pi0's flow time sampling ``t = t_min + (1 - t_min) * Beta(a, b)`` (mass towards noisy t = 1).

    Drawn by inverse-CDF where b == 1 (Beta(a, 1) has CDF u^a) so a torch.Generator makes it reproducible;
    otherwise from ``torch.distributions.Beta``.
    """
    if beta_b == 1.0:
        u = torch.rand(batch, generator=generator, device=device)
        s = u.pow(1.0 / beta_a)
    else:
        s = torch.distributions.Beta(beta_a, beta_b).sample((batch,)).to(device)
    return t_min + (1.0 - t_min) * s
