"""Behaviour cloning: demonstration windows -> the policy family's own training loss (``compute_loss``).

Batch ``step`` is a pure function of (seed, step): the window indices of :func:`vlaflow.train.schedule.
batch_indices` (epoch-wise permutations), this rank's strided share under DDP, cut from the in-RAM window
arrays of :class:`vlaflow.data.windows.WindowSampler`. That is what lets several background threads build
batches ahead of the optimiser and a resumed run see exactly the batches an uninterrupted one saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

import vlaflow.keys as K
import vlaflow.train.schedule as S
from vlaflow.train.objective import Objective


def make_batch(ws, idx: np.ndarray) -> dict[str, Any]:
    """Windows ``idx`` of ``ws`` as torch tensors (B, To, ...) / (B, H, Da), plus task strings if any."""
    b = ws.get_batch(idx)
    out: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
    if ws.tasks:
        out[K.TASK] = [ws.tasks[i] if 0 <= i < len(ws.tasks) else "" for i in b[K.TASK_INDEX].tolist()]
    return out


class BehaviourCloning(Objective):
    """Regress the policy onto demonstration windows with its family's loss (denoising, flow, energy)."""

    prefetch = "parallel"

    def __init__(
        self,
        policy: torch.nn.Module,
        windows,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        start_fraction: float = 0.0,
        start_steps: int = 3,
    ):
        self.module = policy
        self.windows = windows
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.start_fraction = float(start_fraction)
        self.start = windows.start_windows(start_steps) if start_fraction > 0 else np.zeros(0, np.int64)

    def batch(self, step: int) -> dict[str, Any]:
        idx = S.batch_indices(self.seed, step, len(self.windows), self.batch_size)
        idx = S.mix_start(idx, self.seed, step, self.start, self.start_fraction)
        return make_batch(self.windows, S.shard(idx, self.rank, self.world))

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        return self.module.compute_loss(batch)
