"""GPC — General Policy Composition (arXiv 2510.01068): training-free mixing of denoising policies.

Shapes: B batch, H action chunk length, Da action dim. All parents share the action space (H, Da) and the
action normalization; each keeps its own observation conditioning.

One sampler run on a *reference* parent's path, time grid and sampler. At every step, from the shared x_t:

1. each parent gets its own time at the same signal-to-noise ratio ``alpha / sigma`` (``path.time_for_snr``)
   and x_t rescaled onto its path (``rescale_between_paths``): VP diffusion and rectified flow parents meet
   at matched noise level, whatever their step grids;
2. its native prediction (eps / velocity / ...) becomes the path-independent pair (x0, eps), x0 clipped
   where the parent clips its own samples (eps then recomputed so the pair stays consistent with x_t);
3. the pairs are mixed with convex weights and expressed in one parameterization (``space``) on the
   reference path; one sampler step is taken with the mix (``samplers.sample_loop``).

Every parameterization here is affine in (x0, eps) given x_t, so mixing in eps-space, x0-space or
velocity-space yields the same trajectory. With a single weight of 1 on the reference parent, its native
prediction passes through untouched, so the composite reproduces that parent exactly under fixed noise.

:func:`mix_predictions` is one evaluation of steps 1-3; ``ComposedPolicy.predict`` (``composed/model.py``)
is it, so every sampler, RTI-DP and RTC run a composite like any policy; :func:`gpc_sample` runs the
sampler over it for any objects with ``path`` / ``parameterization`` / ``predict`` (the analytic tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vlaflow.errors import ConfigError
from vlaflow.policies.conversions import (
    eps_from_x0,
    from_x0_eps,
    rescale_between_paths,
    to_x0_eps,
)
from vlaflow.policies.samplers import SampleResult, sample_loop


def check_weights(weights: Sequence[float], n_parents: int) -> tuple[float, ...]:
    """Convex weights: one per parent, each >= 0, summing to 1 (within 1e-6)."""
    w = tuple(float(x) for x in weights)
    if len(w) != n_parents:
        raise ConfigError(f"got {len(w)} weights {list(w)} for {n_parents} parents")
    if any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise ConfigError(f"GPC weights must be >= 0 and sum to 1, got {list(w)} (sum {sum(w)})")
    return w


def default_reference(weights: Sequence[float]) -> int:
    """The parent whose path/grid/sampler drives the composite: the heaviest (first on ties)."""
    return max(range(len(weights)), key=lambda i: (weights[i], -i))


def parent_clip(parent) -> float | None:
    """Where ``parent`` clips its own x0 estimates (``clip_x0`` of its default sampler), or None."""
    return parent.sampler_kwargs(parent.config.sampler).get("clip_x0") if hasattr(parent, "config") else None


def mix_predictions(
    parents: Sequence[Any],
    conds: Sequence[Any],
    weights: Sequence[float],
    reference: int,
    space: str,
    x: Tensor,
    t: Tensor,
    clips: Sequence[float | None] | None = None,
) -> Tensor:
    """The composite's prediction (B, H, Da) in ``space`` at ``x`` (B, H, Da), time ``t`` (B,) of the
    reference path: steps 1-3 of the module docstring.

    ``parents``: objects with ``path``, ``parameterization`` and ``predict(x_t, t, cond)``; ``conds``: each
    parent's own condition (its ``encode(obs)``); ``clips``: each parent's x0 clip (default
    :func:`parent_clip`). The numpy twin the ONNX runtime runs is ``vlaflow.deploy.np_compose``.
    """
    ref = parents[reference]
    active = [i for i, w in enumerate(weights) if w > 0]
    if active == [reference] and space == ref.parameterization:
        return ref.predict(x, t, conds[reference])  # untouched: w = 1 reproduces the parent exactly
    clips = [parent_clip(p) for p in parents] if clips is None else clips
    ref_path = ref.path
    b = x.shape[0]
    a_r = ref_path.alpha(t).to(x.device).view(b, 1, 1)
    s_r = ref_path.sigma(t).to(x.device).view(b, 1, 1)
    x0_mix = eps_mix = None
    for i in active:
        p = parents[i]
        if p.path == ref_path:
            t_i, a_i, s_i, x_i = t, a_r, s_r, x
        else:  # same SNR on the parent's path; x_t rescaled so (x0, eps) are shared
            t_i = p.path.time_for_snr((a_r / s_r).view(b))
            a_i = p.path.alpha(t_i).to(x.device).view(b, 1, 1)
            s_i = p.path.sigma(t_i).to(x.device).view(b, 1, 1)
            x_i = rescale_between_paths(x, a_r, s_r, a_i, s_i)
        x0, eps = to_x0_eps(p.predict(x_i, t_i, conds[i]), p.parameterization, x_i, a_i, s_i)
        if clips[i] is not None:
            x0 = x0.clamp(-clips[i], clips[i])
            eps = eps_from_x0(x_i, x0, a_i, s_i)
        w = weights[i]
        x0_mix = w * x0 if x0_mix is None else x0_mix + w * x0
        eps_mix = w * eps if eps_mix is None else eps_mix + w * eps
    return from_x0_eps(x0_mix, eps_mix, space, a_r, s_r)


def composed_predict(
    parents: Sequence[Any],
    conds: Sequence[Any],
    weights: Sequence[float],
    reference: int,
    space: str,
):
    """``predict(x_t, t) -> mixed prediction in ``space`` on the reference path`` for ``sample_loop``."""
    clips = [parent_clip(p) for p in parents]

    def predict(x: Tensor, t: Tensor) -> Tensor:
        return mix_predictions(parents, conds, weights, reference, space, x, t, clips)

    return predict


def gpc_sample(
    parents: Sequence[Any],
    conds: Sequence[Any],
    weights: Sequence[float],
    noise: Tensor,
    *,
    reference: int | None = None,
    space: str | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    return_chain: bool = False,
) -> SampleResult:
    """Composite sample (normalized actions, (B, H, Da)) from the shared initial ``noise`` (B, H, Da).

    ``reference`` (default: heaviest parent) supplies the path, time grid, sampler and its options
    (``sampler_kwargs``); ``space`` (default: its native parameterization) is where predictions are mixed.
    """
    if len(parents) != len(conds):
        raise ConfigError(f"{len(parents)} parents but {len(conds)} conditions")
    weights = check_weights(weights, len(parents))
    reference = default_reference(weights) if reference is None else reference
    if not 0 <= reference < len(parents):
        raise ConfigError(f"reference parent index {reference} out of range for {len(parents)} parents")
    ref = parents[reference]
    cfg = getattr(ref, "config", None)
    sampler = sampler or (cfg.sampler if cfg is not None else "ddim")
    num_steps = num_steps or (cfg.num_inference_steps if cfg is not None else 10)
    space = space or ref.parameterization
    kwargs = ref.sampler_kwargs(sampler) if hasattr(ref, "sampler_kwargs") else {}
    if generator is None:  # deterministic given noise, also for stochastic samplers
        generator = torch.Generator(device=noise.device).manual_seed(0)
    return sample_loop(
        composed_predict(parents, conds, weights, reference, space),
        ref.path,
        noise,
        parameterization=space,
        sampler=sampler,
        num_steps=num_steps,
        generator=generator,
        return_chain=return_chain,
        **kwargs,
    )
