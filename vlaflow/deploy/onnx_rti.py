"""RTI-DP on the torch-free ONNX runtime: the same warm start as :mod:`vlaflow.deploy.rti`, in numpy.

First call of an episode: the full grid (``sampler``/``num_steps``, default DDPM-100 like ``RTIConfig``).
Later calls: the previous clean chunk (normalized) shifted by ``shift`` (last action repeated), optionally
binarized on gripper dims, placed at the grid time t0 that leaves ``n_warm_steps`` steps as ``alpha(t0) x``
("place") or ``alpha(t0) x + sigma(t0) eps`` with one fixed eps per episode ("noised"), then only those
steps with the fresh observation. The
export must have checked the sampler (``vlaflow export --samplers ddpm:100,...``; diffusion exports check
DDPM over the full grid by default).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vlaflow.deploy import np_sampling as nps
from vlaflow.deploy.onnx_runtime import OnnxPolicy
from vlaflow.errors import ConfigError
from vlaflow.interfaces import InferResult, RuntimeSpec


def shift_chunk(chunk: np.ndarray, shift: int) -> np.ndarray:
    """(B, H, Da) advanced by ``shift`` steps, last action repeated (twin of ``rti.shift_chunk``)."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    h = chunk.shape[1]
    return chunk[:, np.minimum(np.arange(h) + shift, h - 1)]


class OnnxRTIPolicy:
    """``infer(obs, shift=None) -> (H, Da)`` by RTI-DP over an exported policy; counts ``last_nfe``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        sampler: str = "ddpm",
        num_steps: int = 100,
        n_warm_steps: int = 0,
        warm_mode: str = "place",
        gripper_dims: tuple[int, ...] = (),
        providers=None,
        seed: int = 0,
        threads: int = 1,
    ):
        n_warm_steps = n_warm_steps or nps.default_warm_steps(num_steps)  # 0: the default, as RTIConfig
        if not 1 <= n_warm_steps <= num_steps:
            raise ConfigError(f"n_warm_steps must be in 1..num_steps={num_steps}, got {n_warm_steps}")
        if warm_mode not in ("place", "noised"):
            raise ConfigError(f"warm_mode must be 'place' or 'noised', got {warm_mode!r}")
        self.base = OnnxPolicy(
            directory, providers=providers, sampler=sampler, num_steps=num_steps, seed=seed, threads=threads
        )
        self.n_warm_steps, self.warm_mode, self.gripper_dims = n_warm_steps, warm_mode, tuple(gripper_dims)
        self.seed = seed
        self.nfe_history: list[int] = []
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.base.config

    @property
    def last_nfe(self) -> int:
        return self.base.last_nfe

    def reset(self, seed: int | None = None) -> None:
        self.base.reset(self.seed if seed is None else seed)
        spec = self.config
        self._warm_eps = self.base._rng.standard_normal((1, spec.horizon, spec.action_dim), dtype=np.float32)
        self._prev: np.ndarray | None = None
        self.nfe_history = []

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        b, spec = self.base, self.config
        shift = spec.n_action_steps if shift is None else int(shift)
        cond = b.encode(obs)
        if self._prev is None:
            noise = b._rng.standard_normal((1, spec.horizon, spec.action_dim), dtype=np.float32)
            x0 = b.denoise(cond, noise)
        else:
            ts = b.timesteps(b.sampler, b.num_steps)[-(self.n_warm_steps + 1) :]
            x = shift_chunk(self._prev, shift)
            if self.gripper_dims:
                d = list(self.gripper_dims)
                x = x.copy()
                x[..., d] = np.where(x[..., d] >= 0, 1.0, -1.0).astype(np.float32)
            x = b.path.alpha(ts[0]) * x  # "place": the marginal's mean at t0 (rti.warm_start)
            if self.warm_mode == "noised":
                x = x + b.path.sigma(ts[0]) * self._warm_eps
            x0, nfe = nps.sample_loop(
                lambda xt, t: b.predict(xt, t, cond),
                b.path,
                x,
                parameterization=b.parameterization,
                sampler=b.sampler,
                timesteps=ts,
                eta=b.eta,
                clip_x0=b.clip_x0,
                step_noise=lambda i, shape: b._rng.standard_normal(shape, dtype=np.float32),
            )
            b.last_nfe = nfe
        self._prev = x0
        self.nfe_history.append(b.last_nfe)
        return InferResult(np.asarray(b.unnormalize_action(x0[0]), np.float32), nfe=b.last_nfe)


def load_onnx_rti_policy(directory: str | os.PathLike, **kwargs) -> OnnxRTIPolicy:
    """Picklable factory target for the sim harness's workers."""
    return OnnxRTIPolicy(directory, **kwargs)
