"""RTC: Real-Time Chunking by inpainting with guidance (arXiv 2506.07339), for flow and diffusion policies.

Shapes: H chunk length, Da action dim, d the inference delay in control steps, s the execution horizon
(control steps executed between the previous chunk's first action and this chunk's first action).

While chunk k executes, chunk k+1 is generated. Its first d actions will have been executed from chunk k
by the time it lands, so they are frozen to chunk k's values; the rest of the overlap is inpainted with
a soft mask (:func:`soft_mask`: 1 on the first d steps, exponential decay to 0 by step H - s). The
target Y is the previous chunk shifted left by s (``Y[i] = prev[i + s]``). After sampling, the first d
actions are set to Y exactly (guidance only pulls them close; the executor runs chunk k's values there).

Guidance, written once for every Gaussian path (no flow-only algebra): at each step, with the network's
clean estimate x0(x_t) and the masked error ``e = W * (Y - x0)``, the VJP ``g = (d x0 / d x_t)^T e`` is
taken with torch.autograd. In rectified-flow coordinates (``x_rf = x / (alpha + sigma)``,
``t_rf = sigma / (alpha + sigma)``) the paper's update is ``u' = u - w g_rf`` with
``w = min(c r^-2, beta)``, ``c = t_rf / (1 - t_rf) = sigma / alpha`` and
``r^2 = t_rf^2 / (t_rf^2 + (1 - t_rf)^2) = sigma^2 / (alpha^2 + sigma^2)``, i.e.
``w = min((alpha^2 + sigma^2) / (alpha sigma), beta)``. The same correction, expressed as a shift of the
prediction at fixed x_t (``x0' = x0 + w sigma g``, ``eps' = eps - w alpha g``), is handed to the
unchanged sampler step: plain Euler for flow policies (exactly the paper's update), DDIM/DDPM for
diffusion policies through the parameterization conversions. ``beta = 0`` returns the network's
prediction untouched, so sampling is bit-identical to plain sampling.

:class:`RTCRuntime` has the runtime interface; ``infer(obs, shift=None, delay=None)`` — without
``delay`` it estimates d online from its own measured wall-clock latency (the maximum of recent calls).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlaflow.errors import ConfigError
from vlaflow.interfaces import InferResult, RuntimeSpec
from vlaflow.policies.conversions import from_x0_eps, to_x0_eps
from vlaflow.policies.samplers import SAMPLERS, SampleResult, sample_loop

from .rti import obs_batch, shift_chunk


@dataclass(frozen=True)
class RTCConfig:
    """RTC guidance settings."""

    beta: float = 5.0  # guidance weight clip (paper: 5-10); 0 turns guidance off (plain sampling)
    sampler: str = ""  # sampler ("" = the policy's default: euler for flow, ddim for diffusion)
    num_steps: int = 0  # sampler steps (0 = the policy's default)
    default_delay: int = 0  # d used until a latency has been measured (steps)
    latency_window: int = 10  # online delay estimate: max latency of the last N calls
    seed: int = 0  # noise seed (reset(seed) overrides)

    def __post_init__(self):
        if self.beta < 0:
            raise ConfigError(f"RTCConfig.beta must be >= 0, got {self.beta}")
        if self.sampler and self.sampler not in SAMPLERS:
            raise ConfigError(f"RTCConfig.sampler must be one of {SAMPLERS} or '', got {self.sampler!r}")
        if self.num_steps < 0 or self.default_delay < 0 or self.latency_window < 1:
            raise ConfigError(
                f"RTCConfig: num_steps/default_delay must be >= 0 and latency_window >= 1, got "
                f"{self.num_steps}/{self.default_delay}/{self.latency_window}"
            )


def soft_mask(horizon: int, delay: int, exec_horizon: int) -> Tensor:
    """(H,) weights: 1 for i < d, ``c (e^c - 1) / (e - 1)`` with ``c = (H - s - i) / (H - s - d + 1)`` for
    d <= i < H - s, 0 from H - s on (the paper's eq. 5)."""
    h, d, s = int(horizon), int(delay), int(exec_horizon)
    if not 0 <= d <= h or not 0 <= s <= h:
        raise ValueError(f"need 0 <= delay, exec_horizon <= horizon; got d={d}, s={s}, H={h}")
    w = torch.zeros(h)
    for i in range(h):
        if i < d:
            w[i] = 1.0
        elif i < h - s:
            c = (h - s - i) / (h - s - d + 1)
            w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


def guidance_weight(alpha: Tensor, sigma: Tensor, beta: float) -> Tensor:
    """``min((alpha^2 + sigma^2) / (alpha sigma), beta)``: the paper's ``min(c r^-2, beta)`` on any path."""
    a, s = torch.as_tensor(alpha, dtype=torch.float32), torch.as_tensor(sigma, dtype=torch.float32)
    raw = (a * a + s * s) / (a * s).clamp(min=1e-12)
    return torch.clamp(raw, max=float(beta))


def rtc_predict_fn(policy, cond: Tensor, target: Tensor, mask: Tensor, beta: float):
    """A ``predict(x_t, t)`` for ``sample_loop`` whose prediction carries the RTC guidance term.

    target (B, H, Da): Y in normalized units; mask (H,) soft weights.
    """
    path, param = policy.path, policy.parameterization
    w_mask = mask.to(target.device).view(1, -1, 1)

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        if beta == 0:
            return policy.predict(x_t, t, cond)
        a = path.alpha(t[:1]).view(1, 1, 1).to(x_t.device)
        s = path.sigma(t[:1]).view(1, 1, 1).to(x_t.device)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            pred = policy.predict(x, t, cond)
            x0, eps = to_x0_eps(pred, param, x, a, s)
            err = w_mask * (target - x0)
            (g,) = torch.autograd.grad(x0, x, grad_outputs=err.detach())
        w = guidance_weight(a, s, beta)
        x0g = x0.detach() + w * s * g
        epsg = eps.detach() - w * a * g
        return from_x0_eps(x0g, epsg, param, a, s)

    return predict


def rtc_denoise(
    policy,
    cond: Tensor,
    prev_clean: Tensor | None,
    delay: int,
    exec_horizon: int,
    beta: float,
    sampler: str | None = None,
    num_steps: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """One RTC sample in normalized action space; plain sampling when ``prev_clean`` is None."""
    cfg = policy.config
    sampler = sampler or cfg.sampler
    steps = num_steps or cfg.num_inference_steps
    if prev_clean is None:
        return policy.denoise(cond, noise=noise, sampler=sampler, num_steps=steps, generator=generator)
    h = cfg.horizon
    d = min(max(int(delay), 0), h)
    s = min(max(int(exec_horizon), d), h)  # the executed part covers at least the delay
    target = shift_chunk(prev_clean, s)
    mask = soft_mask(h, d, s)
    shape = (cond.shape[0], h, cfg.action_dim)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=cond.device)
    res = sample_loop(
        rtc_predict_fn(policy, cond, target, mask, beta),
        policy.path,
        noise,
        parameterization=policy.parameterization,
        sampler=sampler,
        num_steps=steps,
        generator=generator,
        **policy.sampler_kwargs(sampler),
    )
    if d > 0:  # the first d actions are executed from the previous chunk anyway: freeze them exactly
        x0 = res.x0.clone()
        x0[:, :d] = target[:, :d]
        res.x0 = x0
    return res


class RTCRuntime:
    """A denoising policy behind ``infer`` / ``reset`` / ``config``, sampling with RTC guidance.

    ``infer(obs, shift=None, delay=None)``: shift = steps executed since the previous chunk's first action
    (default Ta); delay = d in steps (default: the online estimate from measured latency).
    """

    def __init__(self, policy, rtc: RTCConfig | None = None, device: str | None = None):
        self.policy = policy if device is None else policy.to(device)
        if getattr(self.policy, "action_offset", 0):
            raise ConfigError(
                "RTC does not yet support a policy whose network chunk starts before the current step "
                "(action_offset > 0: an imported LeRobot policy); run it with the plain sampler"
            )
        self.policy.eval()
        for p in self.policy.parameters():  # only d x0 / d x_t is needed; no parameter gradients
            p.requires_grad_(False)
        self.rtc = rtc or RTCConfig()
        self.last_nfe = 0
        self.last_delay = 0
        self._latencies: deque = deque(maxlen=self.rtc.latency_window)
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.policy.spec

    def reset(self, seed: int | None = None) -> None:
        s = self.rtc.seed if seed is None else seed
        self._gen = torch.Generator(device=self.policy.device).manual_seed(int(s))
        self._prev: Tensor | None = None

    def estimated_delay(self) -> int:
        """d = ceil(max recent latency * fps), or the configured default before any measurement."""
        if not self._latencies:
            return self.rtc.default_delay
        return int(math.ceil(max(self._latencies) * self.config.fps - 1e-9))

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        shift = self.config.n_action_steps if shift is None else int(shift)
        d = self.estimated_delay() if delay is None else int(delay)
        t0 = time.perf_counter()
        with torch.no_grad():
            cond = self.policy.encode(obs_batch(self.config, obs, self.policy.device))
        res = rtc_denoise(
            self.policy,
            cond,
            self._prev,
            d,
            shift,
            self.rtc.beta,
            self.rtc.sampler or None,
            self.rtc.num_steps or None,
            generator=self._gen,
        )
        self._latencies.append(time.perf_counter() - t0)
        self._prev = res.x0.detach()
        self.last_nfe, self.last_delay = res.nfe, d
        actions = self.policy.unnormalize_action(res.x0.detach())[0].float().cpu().numpy()
        return InferResult(actions=actions, nfe=res.nfe, extras={"delay": d})


def load_rtc_policy(path, device: str = "cpu", **rtc_fields) -> RTCRuntime:
    """``vlaflow.load_policy`` + RTC sampling (a picklable factory with ``functools.partial``)."""
    from vlaflow.policies.checkpoint import load_checkpoint

    return RTCRuntime(load_checkpoint(path, device=device), RTCConfig(**rtc_fields))
