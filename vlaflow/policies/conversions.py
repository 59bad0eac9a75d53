"""Conversions between eps / x0 / velocity / score predictions at a known ``(x_t, alpha, sigma)``.

With ``x_t = alpha * x0 + sigma * eps`` any one of the predictions fixes the others:

- ``eps``      : the noise                                  (DDPM's epsilon-prediction)
- ``x0``       : the clean sample
- ``velocity`` : ``eps - x0``, the rectified-flow velocity of pi0 (``dx_t/dt`` on the flow path); it is
  path-independent given (x0, eps), so a VP model's prediction becomes a flow velocity at matched SNR
- ``v``        : ``alpha * eps - sigma * x0`` (Salimans & Ho's v-prediction, diffusers' "v_prediction")
- ``score``    : ``grad log p(x_t) = -eps / sigma``

Moving between two paths at matched signal-to-noise ratio ``alpha / sigma`` only rescales x_t (x0 and eps
are shared): ``x_dst = x_src * (alpha_dst + sigma_dst) / (alpha_src + sigma_src)``.

All functions are pure and broadcast: ``alpha``/``sigma`` may be scalars or tensors shaped like (B, 1, 1).
"""

from __future__ import annotations

from torch import Tensor

PARAMETERIZATIONS = ("eps", "x0", "velocity", "v", "score")


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    return (x_t - alpha * x0) / sigma


def velocity_from_x0_eps(x0: Tensor, eps: Tensor) -> Tensor:
    return eps - x0


def x0_eps_from_velocity(x_t: Tensor, u: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    # x_t = a x0 + s (u + x0)  ->  x0 = (x_t - s u) / (a + s)
    x0 = (x_t - sigma * u) / (alpha + sigma)
    return x0, u + x0


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    return alpha * eps - sigma * x0


def x0_eps_from_v(x_t: Tensor, v: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    # [x_t; v] = [[a, s], [-s, a]] [x0; eps]; det = a^2 + s^2 (1 on VP paths, not on flow paths).
    det = alpha * alpha + sigma * sigma
    x0 = (alpha * x_t - sigma * v) / det
    eps = (sigma * x_t + alpha * v) / det
    return x0, eps


def score_from_eps(eps: Tensor, sigma) -> Tensor:
    return -eps / sigma


def eps_from_score(score: Tensor, sigma) -> Tensor:
    return -score * sigma


def to_x0_eps(pred: Tensor, parameterization: str, x_t: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
    """Any native prediction -> (x0, eps)."""
    if parameterization == "eps":
        return x0_from_eps(x_t, pred, alpha, sigma), pred
    if parameterization == "x0":
        return pred, eps_from_x0(x_t, pred, alpha, sigma)
    if parameterization == "velocity":
        return x0_eps_from_velocity(x_t, pred, alpha, sigma)
    if parameterization == "v":
        return x0_eps_from_v(x_t, pred, alpha, sigma)
    if parameterization == "score":
        eps = eps_from_score(pred, sigma)
        return x0_from_eps(x_t, eps, alpha, sigma), eps
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def from_x0_eps(x0: Tensor, eps: Tensor, parameterization: str, alpha, sigma) -> Tensor:
    """(x0, eps) -> the requested parameterization."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "velocity":
        return velocity_from_x0_eps(x0, eps)
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if parameterization == "score":
        return score_from_eps(eps, sigma)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, alpha, sigma) -> Tensor:
    """Convert a prediction between parameterizations at the same (x_t, alpha, sigma)."""
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, alpha, sigma)
    return from_x0_eps(x0, eps, dst, alpha, sigma)


def rescale_between_paths(x_t: Tensor, alpha_src, sigma_src, alpha_dst, sigma_dst) -> Tensor:
    """x_t on the source path -> the same (x0, eps) on the destination path at matched SNR.

    Requires ``alpha_src / sigma_src == alpha_dst / sigma_dst`` (use ``path.time_for_snr``); then
    ``alpha_dst = c * alpha_src``, ``sigma_dst = c * sigma_src``, ``c = (a_dst + s_dst) / (a_src + s_src)``.
    """
    return x_t * ((alpha_dst + sigma_dst) / (alpha_src + sigma_src))


def snr(alpha, sigma):
    """Signal-to-noise ratio alpha / sigma (the quantity matched across paths)."""
    return alpha / sigma
