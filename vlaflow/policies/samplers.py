"""Samplers as short functions over a ``predict(x_t, t) -> native prediction`` callable and a Gaussian path.

Shapes: B batch, S the denoised target's shape (a policy's action chunk (H, Da)), K recorded steps.

Every step is written in the path's ``(alpha, sigma)`` only, so each sampler runs on either path (DDIM on
the flow path, Euler on the VP path) and a composer (GPC) can mix parents after converting predictions.

- ``ddpm_step``  : ancestral step with the DDPM posterior q(x_t' | x_t, x0) (= diffusers DDPMScheduler,
  "fixed_small" variance); stochastic, exposes ``mean`` and ``std``.
- ``ddim_step``  : DDIM with ``eta`` (eta = 0 deterministic, eta = 1 the DDPM variance; = diffusers
  DDIMScheduler with ``use_clipped_model_output=False``); exposes ``mean`` and ``std``.
- ``euler_step`` : one Euler step of the probability-flow ODE in rectified-flow coordinates
  (``x / (alpha + sigma)`` against ``t_rf = sigma / (alpha + sigma)``), i.e. plain Euler on the flow path.
- Heun        : Euler predictor plus trapezoidal corrector (a second network call).
- ``onestep``    : one evaluation at the grid's start time, its x0 estimate is the sample (a consistency
  student; the torch twin of :func:`vlaflow.deploy.np_sampling.sample_loop`'s ``onestep``).

:func:`reverse_step` is one step ``(x_t, t, t_next) -> StepResult`` from one native prediction (Heun: two)
for every sampler, and :func:`sample_loop` is a loop over it. That is the seam RL over the denoising chain
needs (DPPO, RL-100): a recorded transition ``(x_t, t) -> x_next`` is re-scored under new weights by
re-predicting at ``(x_t, t)``, rebuilding the step's Gaussian and taking
``gaussian_log_prob(x_next, mean, std)`` (:func:`step_log_prob`, :func:`rescore_chain`); a chain's
log-probability is the sum over its stochastic steps (:func:`chain_log_prob`). ``min_std`` floors the std a
step samples with and is scored with (DPPO's and RL-100's minimum denoising std; the mean is left as the
sampler builds it), ``noise_clip`` clips the drawn noise (DPPO's +-3). Deterministic samplers (Euler, Heun,
DDIM with eta = 0) report ``std = 0``; ``noise_std > 0`` injects Gaussian noise of that scale into every
Euler / Heun step (ReinFlow-style: the ODE step is the mean, ``x_next = mean + noise_std * z``), which makes
flow policies refinable too; a learned scale is the RL objective's parameter, passed in the same way.
:func:`stack_chain` turns a recorded chain into (K, B, ...)
tensors an RL buffer stores; per-sample times ``t`` of shape (B,) are accepted everywhere, so a minibatch
of transitions from different steps of different chains re-scores in one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlaflow.policies.conversions import to_x0_eps
from vlaflow.policies.path import GaussianPath

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "onestep")

PredictFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, *S), t (B,)) -> native prediction (B, *S)
Coefs = tuple[Tensor, Tensor, Tensor, Tensor]  # alpha(t), sigma(t), alpha(t_next), sigma(t_next)


@dataclass
class StepResult:
    """One reverse step ``x_t -> x_next``; for stochastic steps ``x_next = mean + std * noise``.

    ``x_t``, ``t``, ``t_next`` and ``nfe`` are filled by :func:`reverse_step` (the pure step functions
    leave them unset): with them a recorded step can be re-scored under new weights.
    """

    x_next: Tensor  # (B, *S)
    mean: Tensor  # (B, *S) Gaussian mean of x_next given x_t (= x_next for a deterministic step)
    std: Tensor  # () or broadcasting against x (B, 1, ..) for per-sample times; 0 for a deterministic step
    x0: Tensor  # (B, *S) the clean-sample estimate used by the step (after clipping)
    x_t: Tensor | None = None  # (B, *S) the step's input
    t: Tensor | None = None  # () or (B,) path time of x_t
    t_next: Tensor | None = None  # () or (B,) path time of x_next
    nfe: int = 0  # network evaluations the step spent (Heun: 2 except on the last step)


@dataclass
class SampleResult:
    x0: Tensor  # (B, *S) final clean sample
    steps: list[StepResult] = field(default_factory=list)  # filled when return_chain=True
    nfe: int = 0  # network evaluations
    extras: dict = field(default_factory=dict)  # side outputs, e.g. an energy policy's final "energy" (B,)


def _t(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _bcast(v, x: Tensor) -> Tensor:
    """A path coefficient against x (B, *S): 0-dim stays a scalar, per-sample (B,) becomes (B, 1, ..)."""
    v = _t(v)
    return v.view(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


def _is_zero(v: Tensor) -> bool:
    # Only 0-dim coefficients take a Python branch; per-sample ones are handled with tensor ops.
    return v.dim() == 0 and float(v) == 0


def _deterministic(step: StepResult) -> bool:
    """A recorded step that sampled with std 0 (for every sample): it has no density to score."""
    return not bool(_t(step.std).any())


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
    if sn.dim() == 0:
        std = var.sqrt() if float(sn) > 0 else torch.zeros(())
    else:  # per-sample times: the step to the clean end (sigma' = 0) is deterministic
        std = torch.where(sn > 0, var.sqrt(), torch.zeros_like(var))
    x_next = mean if noise is None or _is_zero(std) else mean + std * noise
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
    """log N(x; mean, std^2 I) summed over all but the batch dim; ``std`` is floored at ``min_std``.

    ``std``: a scalar, or per sample ((B,) or (B, 1, ..)) as recorded with per-sample times.
    """
    std = _bcast(std, x)
    std = std.clamp(min=min_std) if min_std > 0 else std
    z = (x - mean) / std
    per = -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(-1)


def chain_log_prob(steps: list[StepResult], min_std: float = 0.0) -> Tensor:
    """Sum of per-step Gaussian log-densities of a recorded stochastic chain (steps with std 0 skipped)."""
    total = None
    for st in steps:
        if min_std == 0 and _deterministic(st):
            continue
        lp = gaussian_log_prob(st.x_next, st.mean, st.std, min_std)
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError("chain has no stochastic step (all std == 0); pass min_std > 0 to score it")
    return total


STOCHASTIC_OPTIONS = (
    "sampler=ddpm",
    "sampler=ddim with eta > 0 (stochastic DDIM, eta=1 in RL-100)",
    "sampler=ddim|ddpm with min_std > 0 (a floored per-step std)",
    "sampler=euler|heun with noise_std > 0 (ReinFlow noise injection)",
)


def is_stochastic(sampler: str, *, eta: float = 0.0, min_std: float = 0.0, noise_std: float = 0.0) -> bool:
    """Whether the sampler with these settings draws noise at its steps (has a density to optimise)."""
    if sampler == "ddpm":
        return True
    if sampler == "ddim":
        return eta > 0 or min_std > 0
    if sampler in ("euler", "heun"):
        return noise_std > 0
    return False


def deterministic_message(sampler: str, **settings) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return (
        f"sampler {sampler!r} ({shown}) takes deterministic steps, which have no density to optimise; "
        f"use one of: {'; '.join(STOCHASTIC_OPTIONS)}"
    )


def reverse_step(
    predict: PredictFn,
    path: GaussianPath,
    x_t: Tensor,
    t: Tensor,
    t_next: Tensor,
    *,
    parameterization: str,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip_x0: float | None = None,
    min_std: float = 0.0,
    noise_clip: float | None = None,
    generator: torch.Generator | None = None,
    draw_noise: bool = True,
    coefs: Coefs | None = None,
    noise_std: float = 0.0,
) -> StepResult:
    """One reverse step ``x_t`` (at path time ``t``) -> ``x_next`` (at ``t_next``, nearer the clean end).

    ``t`` / ``t_next``: 0-dim tensors, or (B,) per-sample times (re-scoring a minibatch of transitions).
    ``clip_x0`` clamps the x0 estimate of DDPM / DDIM / one-step to [-c, c]. A stochastic step (DDPM, DDIM
    with ``eta > 0``, or any DDPM / DDIM step with ``min_std > 0``) draws its noise from ``generator``
    after the prediction (the order the sampling loop always had, so seeded chains stay as they were),
    clipped to [-noise_clip, noise_clip] when given; ``draw_noise=False`` returns ``x_next = mean`` and
    draws nothing, which is what re-scoring a recorded step needs. ``coefs`` are the path's
    ``(alpha(t), sigma(t), alpha(t_next), sigma(t_next))`` when the caller already has them (the sampling
    loop looks the whole grid up once). ``noise_std``: ReinFlow-style noise injected into Euler / Heun steps
    (their ODE step is the mean), floored at ``min_std`` when that is larger; ignored by the other samplers.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    t, t_next = _t(t), _t(t_next)  # left where they are: a CPU grid keeps the branches below sync-free
    if coefs is None:
        coefs = (path.alpha(t), path.sigma(t), path.alpha(t_next), path.sigma(t_next))
    a, s, an, sn = (_bcast(c, x_t) for c in coefs)
    batch = x_t.shape[0]

    def x0_eps_at(x_, t_, a_, s_):
        return to_x0_eps(predict(x_, t_.expand(batch)), parameterization, x_, a_, s_)

    x0, eps = x0_eps_at(x_t, t, a, s)
    nfe = 1
    zero = torch.zeros(())
    if sampler in ("euler", "heun"):
        u = eps - x0
        x_next = euler_step(x_t, u, a, s, an, sn)
        if sampler == "heun" and not _is_zero(sn):
            # Trapezoidal corrector; skipped on the last step to the clean end (EDM's convention).
            x0b, epsb = x0_eps_at(x_next, t_next, an, sn)
            nfe += 1
            u2 = 0.5 * (u + (epsb - x0b))
            corrected = euler_step(x_t, u2, a, s, an, sn)
            # per-sample times: rows stepping to the clean end keep the predictor
            x_next = corrected if sn.dim() == 0 else torch.where(sn > 0, corrected, x_next)
        st = StepResult(x_next=x_next, mean=x_next, std=zero, x0=x0)
        inj = max(float(noise_std), float(min_std)) if noise_std > 0 else 0.0
        if inj > 0:
            st.std = torch.full((), inj)
            if draw_noise:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
                if noise_clip is not None:
                    noise = noise.clamp(-noise_clip, noise_clip)
                st.x_next = x_next + inj * noise
    else:
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if sampler == "onestep":
            st = StepResult(x_next=x0, mean=x0, std=zero, x0=x0)
        else:
            stochastic = sampler == "ddpm" or eta > 0 or min_std > 0
            noise = None
            if stochastic and draw_noise:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
                if noise_clip is not None:
                    noise = noise.clamp(-noise_clip, noise_clip)
            step_noise = noise if min_std == 0 else None  # floored: noise is added below
            if sampler == "ddpm":
                st = ddpm_step(x_t, x0, a, s, an, sn, step_noise)
            else:
                st = ddim_step(x_t, x0, eps, a, s, an, sn, eta, step_noise)
            if min_std > 0:
                st.std = _t(st.std).clamp(min=min_std)
                st.x_next = st.mean if noise is None else st.mean + st.std * noise
    st.x_t, st.t, st.t_next, st.nfe = x_t, t, t_next, nfe
    return st


def step_log_prob(
    predict: PredictFn,
    path: GaussianPath,
    step: StepResult,
    *,
    parameterization: str,
    sampler: str,
    eta: float = 0.0,
    clip_x0: float | None = None,
    min_std: float = 0.0,
    noise_std: float = 0.0,
) -> Tensor:
    """log p(x_next | x_t) (B,) of a recorded step under ``predict`` (e.g. the current weights).

    Re-predicts at the step's ``(x_t, t)``, rebuilds its Gaussian (mean, std) with the same sampler
    settings and scores the recorded ``x_next``; under the weights that sampled it this reproduces
    ``gaussian_log_prob(step.x_next, step.mean, step.std, min_std)``.
    """
    if step.x_t is None or step.t is None or step.t_next is None:
        raise ValueError("the step has no x_t / t / t_next: record it with reverse_step or sample_loop")
    if not is_stochastic(sampler, eta=eta, min_std=min_std, noise_std=noise_std):
        raise ValueError(deterministic_message(sampler, eta=eta, min_std=min_std, noise_std=noise_std))
    new = reverse_step(
        predict,
        path,
        step.x_t,
        step.t,
        step.t_next,
        parameterization=parameterization,
        sampler=sampler,
        eta=eta,
        clip_x0=clip_x0,
        min_std=min_std,
        draw_noise=False,
        noise_std=noise_std,
    )
    return gaussian_log_prob(step.x_next, new.mean, new.std, min_std)


def rescore_chain(
    predict: PredictFn,
    path: GaussianPath,
    steps: list[StepResult],
    *,
    parameterization: str,
    sampler: str,
    eta: float = 0.0,
    clip_x0: float | None = None,
    min_std: float = 0.0,
    noise_std: float = 0.0,
) -> Tensor:
    """A recorded chain's log-probability (B,) under ``predict``: the sum of :func:`step_log_prob` over the
    steps :func:`chain_log_prob` counts (those that sampled with std > 0, or all with ``min_std > 0``)."""
    total = None
    for st in steps:
        if min_std == 0 and _deterministic(st):
            continue
        lp = step_log_prob(
            predict,
            path,
            st,
            parameterization=parameterization,
            sampler=sampler,
            eta=eta,
            clip_x0=clip_x0,
            min_std=min_std,
            noise_std=noise_std,
        )
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError("chain has no stochastic step (all std == 0); pass min_std > 0 to score it")
    return total


CHAIN_FIELDS = ("x_t", "t", "t_next", "x_next", "mean", "std", "x0")


def stack_chain(steps: list[StepResult]) -> dict[str, Tensor]:
    """A recorded chain as tensors an RL buffer stores: ``x_t``, ``x_next``, ``mean``, ``x0`` (K, B, *S);
    ``t``, ``t_next``, ``std`` (K, B) (scalars repeated per sample). Inverse: :func:`unstack_chain`."""
    if not steps:
        raise ValueError("empty chain: sample with return_chain=True (record_chain=True)")
    b = steps[0].x_next.shape[0]

    def per_sample(v) -> Tensor:
        v = _t(v)
        return v.reshape(-1).expand(b) if v.numel() == 1 else v.reshape(b)

    out = {}
    for name in CHAIN_FIELDS:
        vals = [getattr(st, name) for st in steps]
        if any(v is None for v in vals):
            raise ValueError(f"step field {name!r} was not recorded: record the chain with reverse_step")
        out[name] = torch.stack([per_sample(v) if name in ("t", "t_next", "std") else v for v in vals])
    return out


def unstack_chain(arrays: dict) -> list[StepResult]:
    """:func:`stack_chain`'s output (tensors or numpy arrays) back into per-step results with per-sample
    times, ready for :func:`rescore_chain`."""
    k = len(arrays["x_t"])
    f = {name: _t(arrays[name]) for name in CHAIN_FIELDS}
    return [
        StepResult(
            x_next=f["x_next"][i],
            mean=f["mean"][i],
            std=f["std"][i],
            x0=f["x0"][i],
            x_t=f["x_t"][i],
            t=f["t"][i],
            t_next=f["t_next"][i],
        )
        for i in range(k)
    ]


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
    min_std: float = 0.0,
    noise_clip: float | None = None,
    noise_std: float = 0.0,
) -> SampleResult:
    """Integrate from ``x_init`` (noise at ``timesteps[0]``) to the clean end of the path.

    ``timesteps`` defaults to ``path.timesteps(num_steps)``; passing a suffix of it starts mid-chain
    (RTI-DP's warm start). ``clip_x0`` clamps the x0 estimate of DDPM/DDIM steps to [-c, c] (Diffusion
    Policy's clipped samples). Stochastic noise comes from ``generator`` (deterministic given its seed).
    ``onestep`` evaluates once at ``timesteps[0]`` and returns that x0, whatever the rest of the grid.
    ``min_std`` / ``noise_clip`` / ``noise_std``: see :func:`reverse_step`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    ts = path.timesteps(num_steps) if timesteps is None else _t(timesteps)
    if sampler == "onestep":
        ts = ts[[0, -1]]
    # One lookup of the whole grid instead of four per step (elementwise, so the same values).
    alphas, sigmas = path.alpha(ts), path.sigma(ts)
    x = x_init
    steps: list[StepResult] = []
    nfe = 0
    for i in range(len(ts) - 1):
        st = reverse_step(
            predict,
            path,
            x,
            ts[i],
            ts[i + 1],
            parameterization=parameterization,
            sampler=sampler,
            eta=eta,
            clip_x0=clip_x0,
            min_std=min_std,
            noise_clip=noise_clip,
            generator=generator,
            coefs=(alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]),
            noise_std=noise_std,
        )
        nfe += st.nfe
        x = st.x_next
        if return_chain:
            steps.append(st)
    return SampleResult(x0=x, steps=steps, nfe=nfe)
