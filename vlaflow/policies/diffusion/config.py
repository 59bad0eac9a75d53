"""Diffusion Policy config: DDPM (VP, squared-cosine, 100 steps), epsilon prediction, DDIM/DDPM sampling."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from vlaflow.policies.base_config import PolicyConfig, _check


@dataclass(frozen=True)
class DiffusionConfig(PolicyConfig):
    family: str = "diffusion"  # registry name (fixed)
    sampler: str = "ddim"  # "ddim" (default, 10 steps) | "ddpm" (the paper's 100 steps) | "euler" | "heun"
    num_train_steps: int = 100  # N discrete diffusion steps of the squared-cosine schedule
    ddim_eta: float = 0.0  # DDIM stochasticity (0 deterministic, 1 = DDPM variance)
    clip_sample: bool = True  # clamp the x0 estimate of DDPM/DDIM steps (Diffusion Policy: True)
    clip_sample_range: float = 1.0  # clamp range; actions are minmax-normalized to [-1, 1]
    # Rows of the network's chunk before the current step, dropped after sampling: LeRobot and the original
    # Diffusion Policy predict the horizon from the oldest observation step (To - 1 rows lie in the past);
    # vlaflow's own windows start the chunk at the current step (0). Set by `vlaflow import-lerobot`.
    action_offset: int = 0

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "euler", "heun")

    def __post_init__(self):
        _check(self.family == "diffusion", f"DiffusionConfig.family must be 'diffusion', got {self.family!r}")
        super().__post_init__()
        _check(self.num_train_steps >= 2, f"num_train_steps must be >= 2, got {self.num_train_steps}")
        _check(
            self.num_inference_steps <= self.num_train_steps,
            f"num_inference_steps {self.num_inference_steps} must be <= "
            f"num_train_steps {self.num_train_steps}",
        )
        _check(0.0 <= self.ddim_eta <= 1.0, f"ddim_eta must be in [0, 1], got {self.ddim_eta}")
        _check(self.clip_sample_range > 0, f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        _check(
            0 <= self.action_offset < self.n_obs_steps,
            f"action_offset must be in 0..n_obs_steps-1={self.n_obs_steps - 1}, got {self.action_offset}",
        )
        _check(
            self.n_action_steps <= self.horizon - self.action_offset,
            f"n_action_steps {self.n_action_steps} must be <= horizon - action_offset = "
            f"{self.horizon - self.action_offset}",
        )
