"""The low-dim diffusion world model's configuration (a frozen dataclass, saved as JSON in checkpoints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.policies.base_config import MLPConfig, NetConfig, _to_jsonable, dataclass_from_dict

ACTION_ENCODINGS = ("two_hot", "continuous")
WM_SAMPLERS = ("euler", "heun", "ddim")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class WorldModelConfig:
    task: str = ""  # the task the model was trained on (recorded; a request for another is refused)
    obs_key: str = "obs.state"  # the observation it predicts and conditions on
    action_key: str = "action"
    obs_dim: int = 5  # Do (PushT state: agent x, y, block x, y, angle)
    action_dim: int = 2  # Da
    n_obs_steps: int = 2  # To: past observations in the condition
    n_future: int = 1  # Tf: next observations per call (= the policy's Ta: one call per chunk)
    action_encoding: str = "two_hot"  # "two_hot" (World4RL) or "continuous" (the ablation)
    n_bins: int = 51  # two-hot bins per action dimension, uniform on the normalized range [-1, 1]
    predict_delta: bool = True  # the target is next - last observation (low-dim: far easier than absolute)
    angle_dims: tuple[int, ...] = ()  # observation dims that are angles mod 2pi (PushT: (4,)); sin/cos inputs
    sigma_data: float = 1.0  # EDM's data std (targets are mean/std normalized)
    sigma_min: float = 0.002  # EDM path / sampling grid, see vlaflow.world_models.edm.EDMPath
    sigma_max: float = 5.0
    rho: float = 7.0
    p_mean: float = -0.4
    p_std: float = 1.2
    time_scale: float = 25.0  # the head's sinusoidal time embedding reads c_noise * time_scale
    sampler: str = "euler"  # DIAMOND: Euler
    num_inference_steps: int = 3  # DIAMOND: 3
    net: NetConfig = field(
        default_factory=lambda: NetConfig(kind="mlp", mlp=MLPConfig(width=256, n_blocks=3))
    )

    def __post_init__(self):
        _check(self.obs_dim >= 1 and self.action_dim >= 1, f"obs_dim/action_dim must be >= 1: {self}")
        _check(self.n_obs_steps >= 1, f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        _check(self.n_future >= 1, f"n_future must be >= 1, got {self.n_future}")
        _check(
            self.action_encoding in ACTION_ENCODINGS,
            f"action_encoding must be one of {ACTION_ENCODINGS}, got {self.action_encoding!r}",
        )
        _check(self.n_bins >= 2, f"n_bins must be >= 2, got {self.n_bins}")
        _check(
            all(0 <= d < self.obs_dim for d in self.angle_dims),
            f"angle_dims {self.angle_dims} must index observation dims 0..{self.obs_dim - 1}",
        )
        _check(self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}")
        _check(self.sampler in WM_SAMPLERS, f"sampler must be one of {WM_SAMPLERS}, got {self.sampler!r}")
        _check(self.num_inference_steps >= 1, f"num_inference_steps must be >= 1: {self.num_inference_steps}")

    @property
    def target_key(self) -> str:
        return "wm.target"

    @property
    def next_key(self) -> str:
        """The batch key of the Tf next observations (B, Tf, Do) a training batch carries."""
        return "next." + self.obs_key

    def check_fits(
        self,
        where: str,
        *,
        task: str,
        obs_shapes: dict[str, tuple[int, ...]] | None = None,
        action_dim: int = 0,
        user: str = "the policy",
    ) -> None:
        """Refuse a use (``user``) of another task, observation keys or action dimension than this model was
        trained on (``obs_shapes`` None: the task only); the error names what the model has (``where``: its
        checkpoint)."""
        if self.task != task:
            raise VlaflowError(f"world model {where} was trained on task {self.task!r}, not {task!r}")
        if obs_shapes is None:
            return
        keys = tuple(obs_shapes)
        if keys != (self.obs_key,):
            raise VlaflowError(f"{user} reads {keys}; the world model {where} predicts only {self.obs_key!r}")
        if tuple(obs_shapes[self.obs_key]) != (self.obs_dim,) or action_dim != self.action_dim:
            raise VlaflowError(
                f"world model {where} has {self.obs_key!r} {(self.obs_dim,)} and action dim "
                f"{self.action_dim}; {user} has {self.obs_key!r} {tuple(obs_shapes[self.obs_key])} and "
                f"action dim {action_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldModelConfig:
        return dataclass_from_dict(cls, d)

    def replace(self, **changes) -> WorldModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, WorldModelConfig] = {
    # PushT low-dim: state (5,) with the block angle mod 2pi, target-position actions (2,)
    "pusht_lowdim": WorldModelConfig(task="pusht", obs_dim=5, action_dim=2, angle_dims=(4,)),
}
