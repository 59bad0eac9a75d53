"""The runtime interface every policy is used through: sim evaluation, the deploy layer, users' scripts.

Timing (the classic off-by-one of this field, drawn once)::

    control step:      t-To+1 ... t-1   t   t+1 ... t+Ta-1 ... t+H-1
    observations:      [----- To -------]                               obs[-1] is the current step t
    action chunk:                       [0] [1] ... [Ta-1]  ...  [H-1]  chunk[0] is the action for step t
    executed:                           [------ Ta ------]               then replan at t+Ta

Training windows use the same alignment: observations t-To+1..t, actions t..t+H-1, both edge-padded at
episode borders (repeat the first/last step) so every step of every episode can start a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class RuntimeSpec:
    """What a caller needs to feed a policy and execute its chunks."""

    n_obs_steps: int  # To: observation steps the policy reads (the last To, oldest first)
    horizon: int  # H: actions per predicted chunk; chunk[0] is the action for the current step
    n_action_steps: int  # Ta: actions executed before replanning (Ta <= H)
    obs_shapes: dict[str, tuple[int, ...]]  # store key -> per-step shape, e.g. {"obs.state": (5,)}
    action_dim: int  # Da
    fps: float  # control rate the policy was trained at
    task: str = ""  # default instruction text for language-conditioned policies
    extra: dict = field(default_factory=dict)  # family-specific read-only facts (sampler, nfe, ...)

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return tuple(self.obs_shapes)

    def __post_init__(self):
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(
                f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}"
            )


@runtime_checkable
class RuntimePolicy(Protocol):
    """``infer`` maps the last To observations per key to an (H, Da) chunk in the dataset's action units.

    ``obs`` holds arrays keyed as in the store: ``obs.state`` of shape (To, D), ``obs.image.<cam>`` of
    shape (To, h, w, 3) uint8; a language-conditioned policy also reads ``obs["task"]`` (a str) when given.
    """

    config: RuntimeSpec

    def infer(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...

    def reset(self) -> None: ...
