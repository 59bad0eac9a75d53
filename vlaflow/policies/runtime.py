"""The runtime object behind ``vlaflow.load_policy``: numpy obs window in, (H, Da) raw actions out.

Stateless per call (encode once, sample once); action queues and latency handling live in wrappers
(the sim harness, the real-time executor) that use the same ``infer`` / ``reset`` / ``config`` interface.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vlaflow.errors import VlaflowError
from vlaflow.policies.contract import TASK
from vlaflow.policies.interface import RuntimeSpec


class PolicyRuntime:
    """Wraps a built policy (in memory, e.g. during training) or a loaded checkpoint."""

    def __init__(
        self,
        policy,
        device: str | torch.device | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
    ):
        self.policy = policy if device is None else policy.to(device)
        self.sampler = sampler
        self.num_steps = num_steps
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self.policy.spec

    def reset(self) -> None:
        """Start of an episode: re-seed the sampling noise when a seed was given."""
        if self.seed is not None:
            self._generator = torch.Generator(device=self.policy.device).manual_seed(self.seed)

    def infer(self, obs: dict[str, Any]) -> np.ndarray:
        """obs: arrays with leading To per key (plus optional ``task`` str) -> (H, Da) float32 raw actions."""
        spec = self.config
        missing = [k for k in spec.obs_keys if k not in obs]
        if missing:
            raise VlaflowError(
                f"obs is missing key(s) {missing}; the policy needs {list(spec.obs_keys)}, got {sorted(obs)}"
            )
        batch: dict[str, Any] = {}
        for k, shape in spec.obs_shapes.items():
            x = np.asarray(obs[k])
            if x.shape[1:] != tuple(shape) or x.shape[0] < spec.n_obs_steps:
                raise VlaflowError(
                    f"obs[{k!r}] has shape {x.shape}, "
                    f"expected ({spec.n_obs_steps}, {', '.join(map(str, shape))})"
                )
            batch[k] = torch.from_numpy(np.ascontiguousarray(x[-spec.n_obs_steps :]))[None]
        if TASK in obs:
            batch[TASK] = [str(obs[TASK])]
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.inference_mode():
                actions = self.policy.sample(
                    batch, sampler=self.sampler, num_steps=self.num_steps, generator=self._generator
                )
        finally:
            self.policy.train(was_training)
        return actions[0].float().cpu().numpy()


def load_policy(path: str | os.PathLike, device: str = "cpu", **kwargs) -> PolicyRuntime:
    """Load a checkpoint directory and wrap it; kwargs go to :class:`PolicyRuntime` (sampler, seed...)."""
    from vlaflow.policies.checkpoint import load_checkpoint

    return PolicyRuntime(load_checkpoint(path, device=device), **kwargs)
