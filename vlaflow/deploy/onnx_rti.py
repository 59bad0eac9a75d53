"""RTI-DP on the torch-free ONNX runtime: the same warm start as :mod:`vlaflow.deploy.rti`, in numpy.

The settings are the PyTorch runtime's own :class:`~vlaflow.deploy.rti_config.RTIConfig` (one definition,
so the two runtimes cannot drift apart). First call of an episode: the full grid (``sampler``/``num_steps``,
default DDPM-100). Later calls: the previous clean chunk (normalized) shifted by ``shift`` (last action
repeated), binarized on ``gripper_dims`` only under ``gripper_mode="clip"``, placed at the grid time t0 that
leaves ``n_warm_steps`` steps as ``alpha(t0) x`` ("place") or ``alpha(t0) x + sigma(t0) eps`` with one
fixed eps per episode ("noised"), then only those steps with the fresh observation. The export must have
checked the sampler (``vlaflow export --samplers ddpm:100,...``; diffusion exports check DDPM over the full
grid by default). Works on every export ``OnnxPolicy`` runs, composed policies included; not on a steered
(DSRL) export, whose noise actor chooses the initial noise that RTI replaces (refused, as in PyTorch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vlaflow.deploy import np_sampling as nps
from vlaflow.deploy.onnx_runtime import OnnxPolicy, read_manifest
from vlaflow.deploy.rti_config import RTIConfig
from vlaflow.errors import ConfigError
from vlaflow.interfaces import InferResult, RuntimeSpec


def shift_chunk(chunk: np.ndarray, shift: int) -> np.ndarray:
    """(B, H, Da) advanced by ``shift`` steps, last action repeated (twin of ``rti.shift_chunk``)."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    h = chunk.shape[1]
    return chunk[:, np.minimum(np.arange(h) + shift, h - 1)]


def binarize_dims(chunk: np.ndarray, dims: tuple[int, ...], level: float = 1.0) -> np.ndarray:
    """Snap ``dims`` of a normalized chunk to +-level (sign, 0 -> +level); twin of ``rti.binarize_dims``."""
    if not dims:
        return chunk
    out = chunk.copy()
    d = list(dims)
    out[..., d] = np.where(out[..., d] >= 0, level, -level).astype(out.dtype)
    return out


class OnnxRTIPolicy:
    """``infer(obs, shift=None) -> (H, Da)`` by RTI-DP over an exported policy; counts ``last_nfe``.

    ``OnnxRTIPolicy(DIR, RTIConfig(...))`` or ``OnnxRTIPolicy(DIR, sampler=..., n_warm_steps=...)`` with
    :class:`RTIConfig` fields as keywords.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rti: RTIConfig | None = None,
        *,
        providers=None,
        threads: int = 1,
        **rti_fields,
    ):
        if rti is not None and rti_fields:
            raise ConfigError(f"give an RTIConfig or its fields, not both (got fields {sorted(rti_fields)})")
        self.rti = rti if rti is not None else RTIConfig(**rti_fields)
        r = self.rti
        if r.sampler not in nps.SAMPLERS:
            raise ConfigError(
                f"the ONNX runtime's samplers are {nps.SAMPLERS}, got RTI sampler {r.sampler!r}"
            )
        if read_manifest(directory).get("steering") is not None:
            raise ConfigError(
                f"{directory}: a steered (DSRL-refined) export chooses each chunk's initial noise with its "
                "noise actor; RTI-DP replaces that noise by the previous chunk, so it does not apply "
                "(run it with the plain runtime: merge 'switch' or 'ensemble')"
            )
        self.base = OnnxPolicy(
            directory,
            providers=providers,
            sampler=r.sampler,
            num_steps=r.num_steps,
            seed=r.seed,
            threads=threads,
        )
        if self.base.action_offset:
            raise ConfigError(
                "RTI-DP does not yet support a policy whose network chunk starts before the current step "
                "(action_offset > 0: an imported LeRobot policy); run it with the plain sampler"
            )
        self.nfe_history: list[int] = []
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.base.config

    @property
    def last_nfe(self) -> int:
        return self.base.last_nfe

    def reset(self, seed: int | None = None) -> None:
        self.base.reset(self.rti.seed if seed is None else seed)
        spec = self.config
        self._warm_eps = self.base._rng.standard_normal((1, spec.horizon, spec.action_dim), dtype=np.float32)
        self._prev: np.ndarray | None = None
        self.nfe_history = []

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        b, spec, r = self.base, self.config, self.rti
        shift = spec.n_action_steps if shift is None else int(shift)
        cond = b.encode(obs)
        if self._prev is None:
            noise = b._rng.standard_normal((1, spec.horizon, spec.action_dim), dtype=np.float32)
            x0 = b.denoise(cond, noise)
        else:
            ts = r.warm_timesteps(b.timesteps(b.sampler, b.num_steps))
            x = binarize_dims(shift_chunk(self._prev, shift), r.binarized_dims)
            x = b.path.alpha(ts[0]) * x  # "place": the marginal's mean at t0 (rti.warm_start)
            if r.warm_mode == "noised":
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
