"""Float32 numpy twin of the sampler maths the ONNX runtime runs on the host (torch-free).

Mirrors, line for line, what :mod:`vlaflow.policies.path`, :mod:`vlaflow.policies.conversions` and
:mod:`vlaflow.policies.samplers` do in PyTorch, for the pieces an exported policy needs: the VP
squared-cosine and rectified-flow paths (alpha, sigma, time grid, the time at a given SNR), eps / velocity /
x0 / v <-> (x0, eps), and the DDPM / DDIM / Euler steps. GPC's mixing on top of these is
:mod:`vlaflow.deploy.np_compose`. Everything stays float32 like the torch loop, so parity is limited by the
network, not by the host arithmetic (tests/test_export.py checks each function against its torch original).

Shapes: H action chunk length, Da action dim; ``x`` is (B, H, Da).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

F32 = np.float32
SAMPLERS = ("ddpm", "ddim", "euler", "onestep")


@dataclass(frozen=True)
class NpVPPath:
    """VP path over discrete time k in -1..N-1 (k = -1 clean).

    The abar table is PyTorch's own, carried in the manifest: torch's float32 cumprod differs from a
    sequential numpy one in the last bits (up to ~2e-7), and the table is data, not maths worth re-deriving.
    """

    alphas_cumprod: np.ndarray  # (N,) float32 abar_k, k = 0..N-1
    kind: str = "vp"

    @property
    def num_train_steps(self) -> int:
        return int(len(self.alphas_cumprod))

    def _abar(self, t) -> np.ndarray:
        table = np.concatenate([np.ones(1, F32), np.asarray(self.alphas_cumprod, F32)])
        pos = np.clip(np.asarray(t, F32) + F32(1.0), 0, len(table) - 1).astype(F32)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, len(table) - 1)
        w = (pos - lo.astype(F32)).astype(F32)
        return (table[lo] * (F32(1) - w) + table[hi] * w).astype(F32)

    def alpha(self, t) -> np.ndarray:
        return np.sqrt(self._abar(t)).astype(F32)

    def sigma(self, t) -> np.ndarray:
        return np.sqrt(np.maximum(F32(1.0) - self._abar(t), F32(0))).astype(F32)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' "leading" spacing ``[(K-1)r, ..., r, 0, -1]``, ``r = N // K``."""
        n = self.num_train_steps
        if not 1 <= num_steps <= n:
            raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
        ratio = n // num_steps
        ts = np.arange(num_steps - 1, -1, -1, dtype=F32) * F32(ratio)
        return np.concatenate([ts, np.array([-1.0], F32)])

    def time_for_snr(self, snr) -> np.ndarray:
        """Inverse of alpha / sigma on the piecewise-linear abar table (``VPCosinePath.time_for_snr``)."""
        snr = np.asarray(snr, F32)
        abar_target = (snr * snr / (F32(1) + snr * snr)).astype(F32)
        asc = np.concatenate([np.ones(1, F32), np.asarray(self.alphas_cumprod, F32)])[::-1]  # ascending
        idx = np.clip(np.searchsorted(asc, abar_target, side="left"), 1, len(asc) - 1)
        lo_v, hi_v = asc[idx - 1], asc[idx]
        w = np.clip((abar_target - lo_v) / np.maximum(hi_v - lo_v, F32(1e-12)), F32(0), F32(1)).astype(F32)
        pos = F32(len(asc) - 1) - ((idx - 1).astype(F32) + w)
        return (pos - F32(1.0)).astype(F32)


@dataclass(frozen=True)
class NpFlowPath:
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` (t = 1 noise)."""

    kind: str = "flow"

    def alpha(self, t) -> np.ndarray:
        return (F32(1.0) - np.asarray(t, F32)).astype(F32)

    def sigma(self, t) -> np.ndarray:
        return np.asarray(t, F32).copy()

    def timesteps(self, num_steps: int) -> np.ndarray:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # torch.linspace's float32 formula (start + i*step in the first half, end - (n-1-i)*step after it),
        # so the grid is bit-identical to the PyTorch sampler's.
        n = num_steps + 1
        step = F32((0.0 - 1.0) / (n - 1))
        i = np.arange(n)
        first = F32(1.0) + i.astype(F32) * step
        second = F32(0.0) - (n - 1 - i).astype(F32) * step
        return np.where(i < n // 2, first, second).astype(F32)

    def time_for_snr(self, snr) -> np.ndarray:
        """(1 - t) / t = snr  ->  t = 1 / (1 + snr) (``RectifiedFlowPath.time_for_snr``)."""
        return (F32(1.0) / (F32(1.0) + np.asarray(snr, F32))).astype(F32)


def to_x0_eps(pred: np.ndarray, parameterization: str, x_t: np.ndarray, alpha, sigma):
    """Native prediction -> (x0, eps); the torch original is ``conversions.to_x0_eps``."""
    a, s = F32(alpha), F32(sigma)
    if parameterization == "eps":
        return (x_t - s * pred) / a, pred
    if parameterization == "velocity":
        x0 = (x_t - s * pred) / (a + s)
        return x0, pred + x0
    if parameterization == "x0":
        return pred, (x_t - a * pred) / s
    if parameterization == "v":
        det = a * a + s * s
        return (a * x_t - s * pred) / det, (s * x_t + a * pred) / det
    raise ValueError(
        f"the ONNX runtime supports eps / velocity / x0 / v predictions, got {parameterization!r}"
    )


def from_x0_eps(x0: np.ndarray, eps: np.ndarray, parameterization: str, alpha, sigma) -> np.ndarray:
    """(x0, eps) -> the requested parameterization; the torch original is ``conversions.from_x0_eps``."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "velocity":
        return eps - x0
    if parameterization == "v":
        return F32(alpha) * eps - F32(sigma) * x0
    raise ValueError(
        f"the ONNX runtime supports eps / velocity / x0 / v predictions, got {parameterization!r}"
    )


def ddpm_step(x_t, x0, a, s, an, sn, noise):
    """Ancestral DDPM posterior step (``samplers.ddpm_step``); returns x_next."""
    a, s, an, sn = F32(a), F32(s), F32(an), F32(sn)
    ratio = a / an
    beta = s * s - ratio * ratio * sn * sn
    mean = (an * beta / (s * s)) * x0 + (ratio * sn * sn / (s * s)) * x_t
    var = max(sn * sn / (s * s) * beta, F32(1e-20))
    std = F32(np.sqrt(var)) if sn > 0 else F32(0)
    return mean if noise is None or std == 0 else mean + std * noise


def ddim_step(x_t, x0, eps, a, s, an, sn, eta: float, noise):
    """DDIM with eta (``samplers.ddim_step``); returns x_next."""
    a, s, an, sn = F32(a), F32(s), F32(an), F32(sn)
    ratio = a / an
    var = (sn * sn / (s * s)) * (s * s - ratio * ratio * sn * sn)
    std = F32(eta) * F32(np.sqrt(max(var, F32(0))))
    mean = an * x0 + F32(np.sqrt(max(sn * sn - std * std, F32(0)))) * eps
    return mean if eta == 0 or noise is None else mean + std * noise


def euler_step(x_t, velocity, a, s, an, sn):
    """Euler in rectified-flow coordinates (``samplers.euler_step``)."""
    a, s, an, sn = F32(a), F32(s), F32(an), F32(sn)
    scale = a + s
    x_rf, t_rf = x_t / scale, s / scale
    t_rf_next = sn / (an + sn)
    return (x_rf + (t_rf_next - t_rf) * velocity) * (an + sn)


def sample_loop(
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    path,
    x_init: np.ndarray,
    *,
    parameterization: str,
    sampler: str,
    timesteps: Sequence[float],
    eta: float = 0.0,
    clip_x0: float | None = None,
    step_noise: Callable[[int, tuple], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """Integrate ``x_init`` (noise at ``timesteps[0]``) to the clean end; returns (x0 (B, H, Da), nfe).

    ``sampler="onestep"`` (a consistency student) evaluates once at ``timesteps[0]``, returns its x0.
    ``step_noise(i, shape)`` supplies the fresh noise of stochastic step i (DDPM, DDIM with eta > 0).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"the ONNX runtime's samplers are {SAMPLERS}, got {sampler!r}")
    ts = np.asarray(timesteps, F32)
    x = np.asarray(x_init, F32)
    b = x.shape[0]
    if sampler == "onestep":  # consistency student: x0 from the noise at its start time, one evaluation
        t0 = ts[0]
        x0 = to_x0_eps(
            predict(x, np.full((b,), t0, F32)), parameterization, x, path.alpha(t0), path.sigma(t0)
        )[0]
        return (np.clip(x0, -clip_x0, clip_x0) if clip_x0 else x0).astype(F32), 1
    nfe = 0
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        a, s = path.alpha(t), path.sigma(t)
        an, sn = path.alpha(t_next), path.sigma(t_next)
        pred = predict(x, np.full((b,), t, F32))
        nfe += 1
        x0, eps = to_x0_eps(pred, parameterization, x, a, s)
        if sampler == "euler":
            x = euler_step(x, eps - x0, a, s, an, sn)
            continue
        if clip_x0 is not None:
            x0 = np.clip(x0, -clip_x0, clip_x0)
        stochastic = sampler == "ddpm" or eta > 0
        noise = step_noise(i, x.shape) if stochastic and step_noise is not None else None
        if stochastic and noise is None:
            raise ValueError(f"sampler {sampler!r} (eta={eta}) needs step_noise")
        if sampler == "ddpm":
            x = ddpm_step(x, x0, a, s, an, sn, noise)
        else:
            x = ddim_step(x, x0, eps, a, s, an, sn, eta, noise)
        x = np.asarray(x, F32)
    return x, nfe
