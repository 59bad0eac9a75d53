"""A DSRL-refined policy: the noise actor's deterministic noise, denoised by the frozen base policy.

Shapes: B batch, H chunk, Da action dim, Fo the base's flattened condition. ``infer`` (via
:class:`~vlaflow.policies.runtime.PolicyRuntime`) runs ``cond = base.encode(obs)``,
``w = actor(cond.flatten(1))`` (tanh-bounded mean) and ``base.denoise(cond, noise=w)``: the same chain
as ``vlaflow.train.objectives.dsrl.SteeredRuntime``. The checkpoint is self-contained: config.json embeds
the base config, model.safetensors holds ``base.*`` and ``actor.*``. The noise is the actor's, so an
explicit ``noise`` is refused (RTI-DP / RTC, which feed their own noise, do not apply). ``vlaflow export``
writes the base's graphs plus the actor's (``noise_actor.onnx``: cond -> w), run in this order by the ONNX
runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlaflow.errors import VlaflowError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.policies.denoising import Generation, GenerativeModule
from vlaflow.policies.steered.actor import NoiseActor
from vlaflow.policies.steered.config import SteeredConfig


class SteeredPolicy(GenerativeModule):
    config_class = SteeredConfig
    config: SteeredConfig
    text_encoder = None  # the base's own, if any, lives under base.*

    def __init__(self, config: SteeredConfig, stats: dict, base: nn.Module, actor: nn.Module | None = None):
        super().__init__()
        if base.config.family != config.base_config.get("family"):
            raise VlaflowError(
                f"base is a {base.config.family!r} policy, the config says {config.base_config}"
            )
        self.config, self.base = config, base
        self.normalizer = base.normalizer
        noise_dim = int(np.prod(base.target_shape))
        obs_dim = int(base.n_cond_tokens * base.cond_dim)  # Fo: the base's flattened condition
        self.actor = (
            actor if actor is not None else NoiseActor(obs_dim, noise_dim, config.bound, config.width)
        )
        s = base.spec
        self.spec = RuntimeSpec(
            n_obs_steps=s.n_obs_steps, horizon=s.horizon, n_action_steps=s.n_action_steps,
            obs_shapes=s.obs_shapes, action_dim=s.action_dim, fps=s.fps, task=s.task,
            extra={**s.extra, "family": "steered", "base_family": base.config.family, "bound": config.bound},
        )  # fmt: skip

    @classmethod
    def wrap(cls, base: nn.Module, actor: NoiseActor, width: int) -> SteeredPolicy:
        """The deployable policy of a DSRL run (shares ``base`` and ``actor``; nothing copied)."""
        cfg = SteeredConfig.of(base.config, width, actor.bound)
        return cls(cfg, {}, base, actor)

    def steer(self, cond: Tensor) -> Tensor:
        """The actor's deterministic noise (B, H, Da) for the base's condition ``cond``."""
        w, _ = self.actor(cond.flatten(1), deterministic=True)
        return w.view(cond.shape[0], *self.base.target_shape)

    def generate(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        record_chain: bool = False,
        **kwargs,
    ) -> Generation:
        """Steered chunks (B, H, Da) in raw units; deterministic (actor mean noise, base sampler)."""
        if noise is not None:
            raise VlaflowError("a steered policy chooses its own initial noise; an explicit noise is refused")
        if kwargs:
            raise VlaflowError(f"a steered policy takes no sampler options (got {sorted(kwargs)})")
        cond = self.base.encode(obs)
        res = self.base.denoise(
            cond, noise=self.steer(cond), sampler=sampler, num_steps=num_steps, return_chain=record_chain
        )
        return Generation(actions=self.base.unnormalize_target(res.x0), nfe=res.nfe, chain=res.steps)

    def compute_loss(self, batch):
        raise VlaflowError("a steered policy is trained by `vlaflow refine --algo dsrl`, not by imitation")
