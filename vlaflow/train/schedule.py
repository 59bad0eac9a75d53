"""Pure functions of the step number: learning rate, EMA decay, and which windows form each batch.

Everything a training step draws at random is a function of (seed, step): the batch's window indices
and the torch generator seed for the noise and augmentations. A run resumed at step k therefore sees
exactly the batches and noise the uninterrupted run saw from step k on, without saving RNG state.
"""

from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up then cosine to 0 (or constant).

    Matches diffusers' ``get_cosine_schedule_with_warmup`` (half a cosine period over total - warmup).
    """
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def ema_decay(
    n_updates: int, power: float = 0.75, max_value: float = 0.9999, min_value: float = 0.0
) -> float:
    """EMA decay for the update after ``n_updates`` earlier ones (diffusion_policy's EMAModel, inv_gamma=1).

    The first updates copy the weights (decay 0); the decay then rises as 1 - (1 + step) ** -power, so
    early EMA weights are not dominated by the random initialisation.
    """
    step = max(0, n_updates - 1)
    if step <= 0:
        return 0.0
    value = 1.0 - (1.0 + step) ** -power
    return max(min_value, min(value, max_value))


def batch_indices(seed: int, step: int, n_windows: int, batch_size: int) -> np.ndarray:
    """Global batch of window indices for ``step``: epoch-wise shuffles, permutations from (seed, epoch).

    Within an epoch, batches are consecutive slices of the permutation (drop-last), so every window is
    seen once per epoch. With fewer windows than the batch, windows are drawn with replacement.
    """
    if n_windows < 1:
        raise ValueError("no training windows")
    if n_windows < batch_size:
        return np.random.default_rng([seed, 1, step]).integers(0, n_windows, size=batch_size)
    per_epoch = n_windows // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, 0, epoch]).permutation(n_windows)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def mix_start(indices: np.ndarray, seed: int, step: int, start: np.ndarray, fraction: float) -> np.ndarray:
    """``indices`` with its first ``round(fraction * len)`` entries replaced by windows drawn from ``start``
    (with replacement, from (seed, step): the same batch for any resume)."""
    k = int(round(fraction * len(indices)))
    if k == 0 or len(start) == 0:
        return indices
    out = np.array(indices, copy=True)
    out[:k] = start[np.random.default_rng([seed, 2, step]).integers(0, len(start), size=k)]
    return out


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of a global batch (strided, like DistributedSampler); sizes differ by at most 1."""
    return indices[rank::world_size]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit torch seed for the noise/augmentation of ``step`` on ``rank``."""
    return int(np.random.SeedSequence([seed, step, rank, 7]).generate_state(1, np.uint64)[0] >> np.uint64(1))
