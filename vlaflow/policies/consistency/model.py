"""One-step consistency student (Consistency Policy, arXiv 2405.07503; RL-100's one-step head).

Shapes: B batch, H action chunk length, Da action dim. The student has the teacher's encoders and action
head and lives on the teacher's Gaussian path; ``predict(x_t, t, cond)`` returns its native output
(``x0``, or ``velocity`` for flow teachers so that the teacher's own weights are a good start:
x0 = x_1 - u at t = 1). Sampling is one evaluation at the teacher's start time: the teacher's initial noise
goes in, the teacher's final action (approximately) comes out. Trained by ``vlaflow distill``
(:mod:`vlaflow.train.objectives.distill`) on teacher (noise, trajectory, final action) data, not by
``compute_loss`` on demonstrations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlaflow.errors import VlaflowError
from vlaflow.policies.consistency.config import ConsistencyConfig
from vlaflow.policies.contract import DenoisingPolicy
from vlaflow.policies.path import RectifiedFlowPath, VPCosinePath
from vlaflow.policies.samplers import SampleResult, reverse_step

DISTILL_NOISE, DISTILL_TARGET = "distill.noise", "distill.target"


class ConsistencyPolicy(DenoisingPolicy):
    config_class = ConsistencyConfig
    config: ConsistencyConfig

    def __init__(self, config: ConsistencyConfig, stats: dict):
        self.parameterization = config.parameterization
        super().__init__(config, stats)

    def make_path(self):
        cfg = self.config
        if cfg.teacher_family == "diffusion":
            return VPCosinePath(cfg.num_train_steps)
        return RectifiedFlowPath(cfg.time_scale)

    def default_timesteps(self, num_steps: int) -> Tensor:
        """[start_time, clean end]: one step from the teacher's first sampler time to the data."""
        clean = self.path.timesteps(1)[-1:]
        return torch.cat([torch.tensor([float(self.config.start_time)]), clean])

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        c = self.config.clip_sample_range
        return {"clip_x0": c if c > 0 else None}

    def x0_at(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """The student's clean-chunk estimate (B, H, Da) from x_t at path time t (normalized units); t is a
        scalar or per sample (B,). The ``onestep`` reverse step, also what training regresses."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return reverse_step(
            lambda x, t_: self.predict(x, t_, cond),
            self.path,
            x_t,
            tt,
            tt,
            parameterization=self.parameterization,
            sampler="onestep",
            **self.sampler_kwargs("onestep"),
        ).x0

    def denoise(
        self,
        cond: Tensor,
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        return_chain: bool = False,
        timesteps: Tensor | None = None,
    ) -> SampleResult:
        """The shared denoising path with the ``onestep`` sampler on :meth:`default_timesteps`."""
        if sampler not in (None, "onestep") or num_steps not in (None, 1) or timesteps is not None:
            raise VlaflowError(
                f"a consistency student samples in one step (sampler 'onestep'); got sampler={sampler!r}, "
                f"num_steps={num_steps!r}"
            )
        return super().denoise(cond, noise, "onestep", 1, generator, return_chain)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """MSE of the one-step output to teacher targets carried in the batch (``vlaflow distill`` builds
        them): ``distill.noise`` (B, H, Da) the teacher's initial noise, ``distill.target`` its final chunk
        (normalized)."""
        if DISTILL_NOISE not in batch or DISTILL_TARGET not in batch:
            raise VlaflowError(
                "a consistency student learns from a teacher: train it with `vlaflow distill --teacher CKPT` "
                f"(the batch needs {DISTILL_NOISE!r} and {DISTILL_TARGET!r})"
            )
        cond = self.encode(batch)
        x0 = self.x0_at(batch[DISTILL_NOISE].to(self.device), self.config.start_time, cond)
        loss = torch.nn.functional.mse_loss(x0, batch[DISTILL_TARGET].to(self.device))
        return loss, {"loss": float(loss.detach())}
