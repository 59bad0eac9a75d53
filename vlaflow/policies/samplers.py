"""Samplers as short functions over a ``predict(x_t, t) -> native prediction`` callable and a Gaussian path.

Every step is written in the path's ``(alpha, sigma)`` only, so each sampler runs on either path (DDIM on
the flow path, Euler on the VP path) and a composer (GPC) can mix parents after converting predictions.

- ``ddpm_step``  : ancestral step with the DDPM posterior q(x_t' | x_t, x0) (= diffusers DDPMScheduler,
  "fixed_small" variance); stochastic, exposes ``mean`` and ``std``.
- ``ddim_step``  : DDIM with ``eta`` (eta = 0 deterministic, eta = 1 the DDPM variance; = diffusers
  DDIMScheduler with ``use_clipped_model_output=False``); exposes ``mean`` and ``std``.
- ``euler_step`` : one Euler step of the probability-flow ODE in rectified-flow coordinates
  (``x / (alpha + sigma)`` against ``t_rf = sigma / (alpha + sigma)``), i.e. plain Euler on the flow path.
- Heun        : Euler predictor plus trapezoidal corrector (second network call), in ``sample_loop``.

A stochastic chain's log-probability is the sum of ``gaussian_log_prob(x_next, mean, std)`` over steps
(RL over denoising steps reads ``StepResult.mean`` / ``.std``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlaflow.policies.conversions import to_x0_eps
from vlaflow.policies.path import GaussianPath

SAMPLERS = ("ddpm", "ddim", "euler", "heun")

PredictFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, H, Da), t (B,)) -> native prediction (B, H, Da)


@dataclass
class StepResult:
    """One reverse step ``x_t -> x_next``; for stochastic steps ``x_next = mean + std * noise``."""

    x_next: Tensor  # (B, H, Da)
    mean: Tensor  # (B, H, Da) Gaussian mean of x_next given x_t
    std: Tensor  # scalar tensor; 0 for a deterministic step
    x0: Tensor  # (B, H, Da) the clean-sample estimate used by the step (after clipping)


@dataclass
class SampleResult:
    x0: Tensor  # (B, H, Da) final clean sample
    steps: list[StepResult] = field(default_factory=list)  # filled when return_chain=True
    nfe: int = 0  # network evaluations


def _t(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def ddpm_step(
    x_t: Tensor, x0: Tensor, alpha, sigma, alpha_next, sigma_next, noise: Tensor | None
) -> StepResult:
    """Ancestral DDPM step from time t to t_next < t using the posterior of the forward process.

    Forward transition t_next -> t: ``x_t = (a/a') x_t' + N(0, s^2 - (a/a')^2 s'^2)``; its posterior is
    Gaussian with the mean below and variance ``s'^2 / s^2 * (s^2 - (a/a')^2 s'^2)``.
    """
    a, s, an, sn = _t(alpha), _t(sigma), _t(alpha_next), _t(sigma_next)
    ratio = a / an
    beta = s * s - ratio * ratio * sn * sn  # variance of the single transition, diffusers' current_beta_t
    mean = (an * beta / (s * s)) * x0 + (ratio * sn * sn / (s * s)) * x_t
    var = (sn * sn / (s * s) * beta).clamp(min=1e-20)
    std = var.sqrt() if float(sn) > 0 else torch.zeros(())
    x_next = mean if noise is None or float(std) == 0 else mean + std * noise
    return StepResult(x_next=x_next, mean=mean, std=std, x0=x0)


def ddim_step(
    x_t: Tensor,
    x0: Tensor,
    eps: Tensor,
    alpha,
    sigma,
    alpha_next,
    sigma_next,
    eta: float,
    noise: Tensor | None,
) -> StepResult:
    """DDIM: ``x' = a' x0 + sqrt(s'^2 - std^2) eps + std z`` with ``std = eta * posterior std``."""
    a, s, an, sn = _t(alpha), _t(sigma), _t(alpha_next), _t(sigma_next)
    ratio = a / an
    var = (sn * sn / (s * s)) * (s * s - ratio * ratio * sn * sn)
    std = eta * var.clamp(min=0).sqrt()
    mean = an * x0 + (sn * sn - std * std).clamp(min=0).sqrt() * eps
    x_next = mean if eta == 0 or noise is None else mean + std * noise
    return StepResult(x_next=x_next, mean=mean, std=std, x0=x0)


def _rf_coords(x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    scale = _t(alpha) + _t(sigma)
    return x / scale, _t(sigma) / scale


def euler_step(x_t: Tensor, velocity: Tensor, alpha, sigma, alpha_next, sigma_next) -> Tensor:
    """Euler on the probability-flow ODE in rectified-flow coordinates (``x + dt * u`` on the flow path)."""
    x_rf, t_rf = _rf_coords(x_t, alpha, sigma)
    _, t_rf_next = _rf_coords(x_t, alpha_next, sigma_next)
    x_rf_next = x_rf + (t_rf_next - t_rf) * velocity
    return x_rf_next * (_t(alpha_next) + _t(sigma_next))


def gaussian_log_prob(x: Tensor, mean: Tensor, std, min_std: float = 0.0) -> Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dim; ``std`` is floored at ``min_std``."""
    std = _t(std).clamp(min=min_std) if min_std > 0 else _t(std)
    z = (x - mean) / std
    per = -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(-1)


def chain_log_prob(steps: list[StepResult], min_std: float = 0.0) -> Tensor:
    """Sum of per-step Gaussian log-densities of a recorded stochastic chain (steps with std 0 skipped)."""
    total = None
    for st in steps:
        if float(st.std) == 0 and min_std == 0:
            continue
        lp = gaussian_log_prob(st.x_next, st.mean, st.std, min_std)
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError("chain has no stochastic step (all std == 0); pass min_std > 0 to score it")
    return total


def sample_loop(
    predict: PredictFn,
    path: GaussianPath,
    x_init: Tensor,
    *,
    parameterization: str,
    sampler: str = "ddim",
    num_steps: int = 10,
    eta: float = 0.0,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    return_chain: bool = False,
    timesteps: Tensor | None = None,
) -> SampleResult:
    """Integrate from ``x_init`` (noise at ``timesteps[0]``) to the clean end of the path.

    ``timesteps`` defaults to ``path.timesteps(num_steps)``; passing a suffix of it starts mid-chain
    (RTI-DP's warm start). ``clip_x0`` clamps the x0 estimate of DDPM/DDIM steps to [-c, c] (Diffusion
    Policy's clipped samples). Stochastic noise comes from ``generator`` (deterministic given its seed).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    ts = path.timesteps(num_steps) if timesteps is None else timesteps
    x = x_init
    B = x.shape[0]
    steps: list[StepResult] = []
    nfe = 0

    def x0_eps_at(x_, t_):
        nonlocal nfe
        pred = predict(x_, t_.expand(B))
        nfe += 1
        return to_x0_eps(pred, parameterization, x_, path.alpha(t_), path.sigma(t_))

    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        a, s, an, sn = path.alpha(t), path.sigma(t), path.alpha(t_next), path.sigma(t_next)
        x0, eps = x0_eps_at(x, t)
        if sampler in ("ddpm", "ddim"):
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            stochastic = sampler == "ddpm" or eta > 0
            noise = (
                torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if stochastic
                else None
            )
            if sampler == "ddpm":
                st = ddpm_step(x, x0, a, s, an, sn, noise)
            else:
                st = ddim_step(x, x0, eps, a, s, an, sn, eta, noise)
        else:
            u = eps - x0
            x_next = euler_step(x, u, a, s, an, sn)
            if sampler == "heun" and float(sn) > 0:
                # Trapezoidal corrector; skipped on the last step to the clean end (EDM's convention).
                x0b, epsb = x0_eps_at(x_next, t_next)
                x_next = euler_step(x, 0.5 * (u + (epsb - x0b)), a, s, an, sn)
            st = StepResult(x_next=x_next, mean=x_next, std=torch.zeros(()), x0=x0)
        x = st.x_next
        if return_chain:
            steps.append(st)
    return SampleResult(x0=x, steps=steps, nfe=nfe)
