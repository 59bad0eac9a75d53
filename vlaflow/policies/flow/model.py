"""Flow-matching policy in pi0's convention: ``x_t = (1 - t) x0 + t eps`` with t = 1 pure noise.

Shapes: B batch, H action chunk length, Da action dim. Training draws
``t = 0.001 + 0.999 * Beta(1.5, 1)`` and regresses the velocity ``u = eps - x0`` (= dx_t/dt).
Sampling integrates dx/dt = u from t = 1 to t = 0 with Euler (pi0: 10 steps) or Heun.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vlaflow.policies.contract import DenoisingPolicy
from vlaflow.policies.flow.config import FlowConfig
from vlaflow.policies.path import RectifiedFlowPath, pi0_train_time


class FlowFamily:
    """The flow-matching recipe as hooks of any :class:`~vlaflow.policies.denoising.DenoisingModel`:
    rectified-flow path, velocity prediction, pi0's Beta time sampling.

    Reads ``config.time_scale``, ``time_beta_a``, ``time_beta_b``, ``time_min``.
    """

    parameterization = "velocity"

    def make_path(self) -> RectifiedFlowPath:
        return RectifiedFlowPath(self.config.time_scale)

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        cfg = self.config
        return pi0_train_time(batch_size, cfg.time_beta_a, cfg.time_beta_b, cfg.time_min, device=device)

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        return {}


class FlowPolicy(FlowFamily, DenoisingPolicy):
    config_class = FlowConfig
    config: FlowConfig
