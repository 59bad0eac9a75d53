"""Float32 numpy twin of GPC's mixing (:func:`vlaflow.policies.compose.mix_predictions`), so a composed
export mixes its parents' ONNX predictions on the host (torch-free).

Shapes: B batch (1 in an export), H chunk length, Da action dim. ``parents`` are objects with ``path`` (an
``np_sampling`` path), ``parameterization`` and ``predict(x_t, t, cond)`` -- each parent's own
:class:`~vlaflow.deploy.onnx_runtime.OnnxPolicy` in a composed export. Line for line the torch original:
each active parent is queried at the reference's SNR on its own path (x_t rescaled), its prediction becomes
(x0, eps), x0 clipped where the parent clips (eps recomputed), the pairs mixed with the convex weights and
expressed in ``space`` on the reference path; weight 1 on the reference passes its prediction through.
Whether a parent shares the reference's path is decided by the exporter (PyTorch's path equality) and read
from the manifest, so both sides take the same branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlaflow.deploy.np_sampling import F32, from_x0_eps, to_x0_eps


def mix_predictions(
    parents: Sequence[Any],
    conds: Sequence[np.ndarray],
    weights: Sequence[float],
    reference: int,
    space: str,
    x: np.ndarray,
    t: np.ndarray,
    clips: Sequence[float | None],
    same_path: Sequence[bool],
) -> np.ndarray:
    """The composite's prediction (B, H, Da) in ``space`` at ``x`` (B, H, Da), reference-path time ``t``."""
    ref = parents[reference]
    active = [i for i, w in enumerate(weights) if w > 0]
    if active == [reference] and space == ref.parameterization:
        return ref.predict(x, t, conds[reference])
    x = np.asarray(x, F32)
    b = x.shape[0]
    t = np.broadcast_to(np.asarray(t, F32).reshape(-1), (b,))
    a_r = ref.path.alpha(t).reshape(b, 1, 1)
    s_r = ref.path.sigma(t).reshape(b, 1, 1)
    x0_mix = eps_mix = None
    for i in active:
        p = parents[i]
        if same_path[i]:
            t_i, a_i, s_i, x_i = t, a_r, s_r, x
        else:  # same SNR on the parent's path; x_t rescaled so (x0, eps) are shared
            t_i = p.path.time_for_snr((a_r / s_r).reshape(b))
            a_i = p.path.alpha(t_i).reshape(b, 1, 1)
            s_i = p.path.sigma(t_i).reshape(b, 1, 1)
            x_i = (x * ((a_i + s_i) / (a_r + s_r))).astype(F32)
        x0, eps = to_x0_eps(p.predict(x_i, t_i, conds[i]), p.parameterization, x_i, a_i, s_i)
        if clips[i] is not None:
            c = F32(clips[i])
            x0 = np.clip(x0, -c, c).astype(F32)
            eps = ((x_i - a_i * x0) / s_i).astype(F32)
        w = F32(weights[i])
        x0_mix = w * x0 if x0_mix is None else x0_mix + w * x0
        eps_mix = w * eps if eps_mix is None else eps_mix + w * eps
    return np.asarray(from_x0_eps(x0_mix, eps_mix, space, a_r, s_r), F32)
