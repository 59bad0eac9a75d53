"""One-step consistency student config: the teacher's nets and path, one network evaluation per chunk."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from vlaflow.policies.base_config import PolicyConfig, _check


@dataclass(frozen=True)
class ConsistencyConfig(PolicyConfig):
    family: str = "consistency"  # registry name (fixed)
    sampler: str = "onestep"  # the only sampler: x0 = f(noise at start_time, obs) in one evaluation
    num_inference_steps: int = 1  # network evaluations per chunk (fixed at 1)
    teacher_family: str = "diffusion"  # the teacher's family: its path ("vp" or "flow") is reused
    num_train_steps: int = 100  # VP teacher: its N diffusion steps (the path's time axis)
    time_scale: float = 100.0  # flow teacher: its time embedding scale
    start_time: float = 90.0  # path time of the teacher's first sampler step (where its noise sits)
    parameterization: str = "x0"  # student output: "x0" (diffusion teachers) | "velocity" (flow teachers)
    clip_sample_range: float = 0.0  # clamp the one-step x0 to [-c, c] as the teacher did (0 = no clamp)
    teacher: str = ""  # teacher checkpoint path (provenance only)
    teacher_sampler: str = ""  # sampler the teacher's targets came from (provenance only)
    teacher_steps: int = 0  # its step count (provenance only)

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("onestep",)
    _PARAMS: typing.ClassVar[tuple[str, ...]] = ("x0", "velocity", "eps")

    def __post_init__(self):
        _check(
            self.family == "consistency",
            f"ConsistencyConfig.family must be 'consistency', got {self.family!r}",
        )
        super().__post_init__()
        _check(
            self.teacher_family in ("diffusion", "flow"),
            f"teacher_family must be 'diffusion' or 'flow', got {self.teacher_family!r}",
        )
        _check(
            self.num_inference_steps == 1, f"num_inference_steps must be 1, got {self.num_inference_steps}"
        )
        _check(self.num_train_steps >= 2, f"num_train_steps must be >= 2, got {self.num_train_steps}")
        _check(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}")
        _check(
            self.parameterization in self._PARAMS,
            f"parameterization must be one of {self._PARAMS}, got {self.parameterization!r}",
        )
        _check(self.clip_sample_range >= 0, f"clip_sample_range must be >= 0, got {self.clip_sample_range}")
