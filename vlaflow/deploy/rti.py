"""RTI-DP: the Real-Time Iteration scheme for diffusion/flow policies (arXiv 2508.05396), no retraining.

Shapes: H chunk length, Da action dim, Ta actions executed per replan, s the shift (control steps executed
since the previous chunk's first action, Ta in synchronous chunking).

- First call of an episode: full denoising (the configured sampler and step count).
- An energy policy (EBT, no time grid) runs the same scheme as descents: its own descent from noise first,
  then ``n_warm_steps`` gradient steps from the shifted previous chunk (:func:`_energy_rti`).
- Every later call: the previous *clean* chunk (normalized units) is shifted left by s, its last action
  repeated to pad (:func:`shift_chunk`), and placed at an intermediate time t0 of the same time grid
  (:func:`warm_start`); only the last ``n_warm_steps`` reverse steps run, with the *fresh* observation
  conditioning. Network evaluations per call: ``n_warm_steps`` (e.g. DDPM-100 grid, t0 = k 2: [2, 1, 0],
  3 evaluations instead of 100, the paper's PushT setting; the default here is 20, see RTIConfig).
- ``place`` (the paper's choice, low noise): x_{t0} = alpha(t0) x_prev (the path's mean; unscaled placement
  compounds a 1/alpha(t0) gain over replans). ``noised``: x_{t0} = alpha(t0) x_prev + sigma(t0) eps
  with one fixed eps per episode (deterministic, keeps x_{t0} on the path's marginal scale).
- Discrete dims (gripper): ``gripper_mode="clip"`` binarizes the warm start's gripper dims to +-1 (the
  normalized open/closed extremes); the paper's ``scale`` remedy is a *training* option: train with
  ``data.action_scale_dims=<gripper dims>`` (:func:`gripper_scaled_stats`) so the gripper lives in
  [-1/10, 1/10] and a flip stays reachable.
- :func:`measure_contraction` estimates the Lipschitz ratio ||f(a) - f(b)|| / ||a - b|| of the few-step
  map f over random pairs of warm starts; :func:`choose_warm_steps` picks the smallest t0 whose map
  contracts below a target (the paper's condition for the iteration to converge onto the solution).

The runtime (:class:`RTIRuntime`) has the interface of every runtime (``infer`` / ``reset`` / ``config``);
its ``infer`` takes an optional ``shift=`` (the executor passes the steps executed since the previous
chunk; default Ta), and it counts network evaluations (``last_nfe``, ``nfe_history``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vlaflow.keys as K

# RTIConfig is defined once, torch-free, for this runtime and the ONNX one; importable from here as before.
from vlaflow.deploy.rti_config import GRIPPER_MODES, WARM_MODES, RTIConfig  # noqa: F401
from vlaflow.errors import ConfigError
from vlaflow.interfaces import InferResult, RuntimeSpec, obs_window
from vlaflow.policies.runtime import batch_of_one
from vlaflow.policies.samplers import SampleResult, sample_loop


# ---------------------------------------------------------------------------------------------- pure maths
def shift_chunk(chunk: Tensor, shift: int) -> Tensor:
    """(B, H, Da) -> the same chunk advanced by ``shift`` steps, the last action repeated to pad."""
    h = chunk.shape[1]
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    idx = torch.clamp(torch.arange(h, device=chunk.device) + shift, max=h - 1)
    return chunk[:, idx]


def binarize_dims(chunk: Tensor, dims: tuple[int, ...], level: float = 1.0) -> Tensor:
    """Snap ``dims`` of a normalized chunk to +-level (sign, 0 -> +level): the paper's "clip" remedy."""
    if not dims:
        return chunk
    out = chunk.clone()
    d = list(dims)
    out[..., d] = torch.where(out[..., d] >= 0, level, -level).to(out.dtype)
    return out


def warm_start(
    prev_clean: Tensor, path, t0: Tensor, mode: str = "place", eps: Tensor | None = None
) -> Tensor:
    """x at grid time ``t0`` from a (shifted) clean chunk: ``alpha(t0) x`` ("place") or noised on the path.

    "place" scales by alpha(t0), the mean of the path's marginal: an unscaled clean chunk read at t0 is
    decoded as x / alpha(t0) (1.43x on the flow path at t0 = 0.3), and as each output seeds the next warm
    start the error compounds and drives the actions to the edges of their range.
    """
    if mode == "place":
        return path.alpha(t0) * prev_clean
    if mode == "noised":
        if eps is None:
            raise ValueError("warm_mode 'noised' needs a fixed eps")
        return path.alpha(t0) * prev_clean + path.sigma(t0) * eps
    raise ValueError(f"unknown warm mode {mode!r}; expected one of {WARM_MODES}")


def gripper_scaled_stats(stats: dict, dims: tuple[int, ...] | list[int], factor: float = 10.0) -> dict:
    """RTI-DP's "scale" remedy: ``stats`` with the gripper ``dims`` normalized to 1/``factor`` of their range
    (:func:`vlaflow.data.normalize.scaled_action_stats`). Training does it from the run config:
    ``vlaflow train ... data.action_scale_dims=3`` (``data.action_scale_factor``, default 10)."""
    from vlaflow.data.normalize import scaled_action_stats

    return scaled_action_stats(stats, dims, factor, key=K.ACTION)


# ---------------------------------------------------------------------------------------------- sampling
def rti_denoise(
    policy,
    cond: Tensor,
    prev_clean: Tensor | None,
    shift: int,
    cfg: RTIConfig,
    generator: torch.Generator | None = None,
    warm_eps: Tensor | None = None,
    noise: Tensor | None = None,
) -> SampleResult:
    """One RTI call in normalized action space: full denoising when ``prev_clean`` is None, else warm start.

    ``prev_clean`` (B, H, Da) is the previous call's clean chunk; ``noise`` the full call's initial noise.
    """
    if hasattr(
        policy, "descend_from"
    ):  # an energy policy (EBT): no time grid, the warm start is a descent start
        return _energy_rti(policy, cond, prev_clean, shift, cfg, generator, noise)
    kwargs = policy.sampler_kwargs(cfg.sampler)
    if prev_clean is None:
        return policy.denoise(
            cond, noise=noise, sampler=cfg.sampler, num_steps=cfg.num_steps, generator=generator
        )
    ts = cfg.warm_timesteps(policy.path.timesteps(cfg.num_steps))
    x = binarize_dims(shift_chunk(prev_clean, shift), cfg.binarized_dims)
    x = warm_start(x, policy.path, ts[0], cfg.warm_mode, warm_eps)
    return sample_loop(
        lambda xt, t: policy.predict(xt, t, cond),
        policy.path,
        x,
        parameterization=policy.parameterization,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        generator=generator,
        timesteps=ts,
        **kwargs,
    )


def _energy_rti(policy, cond, prev_clean, shift, cfg: RTIConfig, generator, noise) -> SampleResult:
    """RTI for an energy policy (``descend_from``): the first call is the policy's own descent from noise
    (its sampler, step count and candidates); later calls descend ``n_warm_steps`` gradient steps from the
    shifted previous chunk. NFE counts gradient steps (one energy forward + backward each)."""
    if prev_clean is None:
        res = policy.descend_from(cond, noise, generator=generator)
    else:
        x = binarize_dims(shift_chunk(prev_clean, shift), cfg.binarized_dims)
        res = policy.descend_from(
            cond, x, "descent", cfg.n_warm_steps, generator, num_candidates=1, warm=True
        )
    return SampleResult(x0=res.x, nfe=int(res.steps_used.max()), extras={"energy": res.energy})


@torch.no_grad()
def measure_contraction(
    policy,
    cond: Tensor,
    anchor: Tensor,
    cfg: RTIConfig,
    n_pairs: int = 32,
    scale: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Lipschitz ratio of the few-step map f: x_t0 -> x_clean, over random pairs of warm starts.

    Pairs are ``anchor + scale * N(0, I)`` (anchor: a clean chunk (1, H, Da) for the obs behind ``cond``
    (1, Nc, Fc)); both members of a pair see the same sampler noise, so a ratio < 1 means the tail of the
    sampler pulls nearby warm starts together (the iteration contracts) and > 1 that it spreads them.
    """
    g = torch.Generator(device=cond.device).manual_seed(seed)
    ratios = []
    for i in range(n_pairs):
        a = anchor + scale * torch.randn(anchor.shape, generator=g, device=anchor.device)
        b = anchor + scale * torch.randn(anchor.shape, generator=g, device=anchor.device)
        fa = rti_denoise(policy, cond, a, 0, cfg, torch.Generator(device=cond.device).manual_seed(seed + i))
        fb = rti_denoise(policy, cond, b, 0, cfg, torch.Generator(device=cond.device).manual_seed(seed + i))
        ratios.append(float((fa.x0 - fb.x0).norm() / (a - b).norm().clamp(min=1e-12)))
    r = np.asarray(ratios)
    return {"mean": float(r.mean()), "max": float(r.max()), "p90": float(np.quantile(r, 0.9))}


def choose_warm_steps(
    policy,
    cond: Tensor,
    anchor: Tensor,
    base: RTIConfig,
    candidates: tuple[int, ...] = (3, 5, 10, 20, 30),
    target: float = 0.1,
    scale: float = 0.5,
    **kwargs,
) -> tuple[int, dict[int, dict[str, float]]]:
    """Smallest ``n_warm_steps`` whose measured mean contraction ratio is <= ``target`` (else the largest).

    The perturbation ``scale`` should match how far warm starts are from the solution: the repeated-action
    tail of a shifted chunk is ~0.3-0.5 off in normalized units, and small perturbations (0.1) call the
    map contracting long before it re-plans that tail. On the PushT diffusion benchmark policy
    (DDPM-100 grid, ``benchmarks/results/realtime.md``) scale 0.5 gives ratios 0.66 / 0.22 / 0.092 / 0.043
    at 3 / 10 / 20 / 30 steps and closed-loop scores 0.258 / 0.838 / 0.957 / 0.955 (full: 0.953); target
    0.1 picks 20. One policy's calibration: check the score of the choice on your task.

    Returns (choice, {n_warm_steps: contraction stats}).
    """
    import dataclasses

    table = {}
    for n in candidates:
        if n > base.num_steps:
            continue
        table[n] = measure_contraction(
            policy, cond, anchor, dataclasses.replace(base, n_warm_steps=n), scale=scale, **kwargs
        )
        if table[n]["mean"] <= target:
            return n, table
    return max(table), table


# ---------------------------------------------------------------------------------------------- runtime
def obs_batch(spec: RuntimeSpec, obs: dict[str, Any], device=None) -> dict[str, Any]:
    """A runtime obs window (To, ...) per key -> a checked batch of one for ``policy.encode``."""
    return batch_of_one(obs_window(spec, obs), device)


@dataclass
class _Counter:
    last_nfe: int = 0  # network evaluations of the latest call
    nfe_history: list[int] = field(default_factory=list)  # one entry per call since reset


class RTIRuntime:
    """A denoising policy behind ``infer`` / ``reset`` / ``config``, sampling by RTI-DP.

    ``infer(obs, shift=None)``: ``shift`` is how many control steps of the previous chunk have been executed
    since its first action (the real-time executor passes it; default Ta as in synchronous chunking).
    """

    def __init__(self, policy, rti: RTIConfig | None = None, device: str | None = None):
        self.policy = policy if device is None else policy.to(device)
        if getattr(self.policy, "action_offset", 0):
            raise ConfigError(
                "RTI-DP does not yet support a policy whose network chunk starts before the current step "
                "(action_offset > 0: an imported LeRobot policy); run it with the plain sampler"
            )
        self.policy.eval()
        self.rti = rti or RTIConfig()
        self._counter = _Counter()
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.policy.spec

    @property
    def last_nfe(self) -> int:
        return self._counter.last_nfe

    @property
    def nfe_history(self) -> list[int]:
        return self._counter.nfe_history

    def reset(self, seed: int | None = None) -> None:
        """New episode: forget the previous chunk; reseed the fixed warm-start eps and sampler noise."""
        s = self.rti.seed if seed is None else seed
        dev = self.policy.device
        self._gen = torch.Generator(device=dev).manual_seed(int(s))
        shape = (1, self.config.horizon, self.config.action_dim)
        self._warm_eps = torch.randn(shape, generator=self._gen, device=dev)
        self._prev: Tensor | None = None
        self._counter = _Counter()

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        shift = self.config.n_action_steps if shift is None else int(shift)
        with torch.no_grad():
            cond = self.policy.encode(obs_batch(self.config, obs, self.policy.device))
            res = rti_denoise(self.policy, cond, self._prev, shift, self.rti, self._gen, self._warm_eps)
        self._prev = res.x0
        self._counter.last_nfe = res.nfe
        self._counter.nfe_history.append(res.nfe)
        actions = self.policy.unnormalize_action(res.x0)[0].float().cpu().numpy()
        extras = {"energy": float(res.extras["energy"][0])} if "energy" in res.extras else {}
        return InferResult(actions=actions, nfe=res.nfe, extras=extras)


def load_rti_policy(path, device: str = "cpu", **rti_fields) -> RTIRuntime:
    """``vlaflow.load_policy`` + RTI-DP sampling; ``rti_fields`` are :class:`RTIConfig` fields.

    Picklable with ``functools.partial`` (a factory for ``vlaflow.sim.evaluate(policy=...)``).
    """
    from vlaflow.policies.checkpoint import load_checkpoint

    return RTIRuntime(load_checkpoint(path, device=device), RTIConfig(**rti_fields))
