"""Flow-matching policy config (pi0 style): rectified flow, Beta time sampling, Euler/Heun sampling."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from vlaflow.policies.base_config import PolicyConfig, _check


@dataclass(frozen=True)
class FlowConfig(PolicyConfig):
    family: str = "flow"  # registry name (fixed)
    sampler: str = "euler"  # "euler" (pi0: 10 steps) | "heun" (2 evaluations per step) | "ddim" | "ddpm"
    time_beta_a: float = 1.5  # training time t = t_min + (1 - t_min) * Beta(a, b); pi0: a = 1.5
    time_beta_b: float = 1.0  # pi0: b = 1 (more weight on noisy times near t = 1)
    time_min: float = 0.001  # pi0: 0.001, keeps t away from the data end
    time_scale: float = 100.0  # the network's time embedding reads 100 * t (same range as diffusion's steps)

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("euler", "heun", "ddim", "ddpm")

    def __post_init__(self):
        _check(self.family == "flow", f"FlowConfig.family must be 'flow', got {self.family!r}")
        super().__post_init__()
        _check(
            self.time_beta_a > 0 and self.time_beta_b > 0,
            f"time_beta_a/b must be > 0, got {self.time_beta_a}, {self.time_beta_b}",
        )
        _check(0 <= self.time_min < 1, f"time_min must be in [0, 1), got {self.time_min}")
        _check(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}")
