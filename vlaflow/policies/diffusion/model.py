"""Diffusion Policy (Chi et al., 2023): epsilon-prediction DDPM over action chunks.

Shapes: B batch, H action chunk length, Da action dim. Training draws k ~ U{0..N-1} and eps ~ N(0, I),
forms ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` on the VP squared-cosine path and regresses eps.
Sampling: DDIM (eta) or DDPM ancestral steps with the x0 estimate clipped to [-1, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlaflow.policies.contract import DenoisingPolicy
from vlaflow.policies.diffusion.config import DiffusionConfig
from vlaflow.policies.path import VPCosinePath


class DiffusionFamily:
    """The diffusion recipe as hooks of any :class:`~vlaflow.policies.denoising.DenoisingModel` (policy or
    not): VP squared-cosine path, eps prediction, k ~ U{0..N-1}; DDIM/DDPM with eta and x0 clipping.

    Reads ``config.num_train_steps``, ``ddim_eta``, ``clip_sample``, ``clip_sample_range``.
    """

    parameterization = "eps"

    def make_path(self) -> VPCosinePath:
        return VPCosinePath(self.config.num_train_steps)

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        return torch.randint(0, self.config.num_train_steps, (batch_size,), device=device).float()

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        cfg = self.config
        return {"eta": cfg.ddim_eta, "clip_x0": cfg.clip_sample_range if cfg.clip_sample else None}


class DiffusionPolicy(DiffusionFamily, DenoisingPolicy):
    config_class = DiffusionConfig
    config: DiffusionConfig
