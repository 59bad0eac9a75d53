"""vlaflow: generative visuomotor and vision-language-action policies, from demonstrations to a real arm."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_policy"]


def load_policy(path, device: str = "cpu", **kwargs):
    """Load a policy checkpoint directory; ``infer(obs).actions`` is its (H, Da) chunk.

    ``kwargs`` (``sampler``, ``num_steps``, ``seed``) go to :class:`vlaflow.policies.runtime.PolicyRuntime`;
    see :mod:`vlaflow.interfaces` for the interface (``infer``, ``reset``, ``config``).
    """
    from vlaflow.policies.runtime import load_policy as _load

    return _load(path, device=device, **kwargs)
