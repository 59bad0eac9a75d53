"""Normalizer statistics computed from a store, and the normalizer that travels inside checkpoints.

Modes:
- ``minmax``: [min, max] -> [-1, 1] (Diffusion Policy's choice for actions and low-dim observations)
- ``meanstd``: (x - mean) / std
- ``quantile``: [q01, q99] -> [-1, 1], robust to outliers (pi0's choice); values outside are not clipped
- ``identity``: unchanged (images are scaled by their encoder instead)

Dimensions with (almost) no range are mapped to 0 rather than blown up, and unmapped back to their constant:
a gripper that never moved in the demos must not become a division by zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from vlaflow.errors import ConfigError, StoreError

MODES = ("minmax", "meanstd", "quantile", "identity")
STAT_NAMES = ("min", "max", "mean", "std", "q01", "q99")
_EPS = 1e-6


def compute_stats(store, keys: Iterable[str] | None = None, max_rows: int = 200_000, seed: int = 0) -> dict:
    """Per-element statistics of ``keys`` over all finished steps of ``store``.

    Images get per-channel statistics over a random subset of frames (their mode is normally identity).
    Quantiles use at most ``max_rows`` random rows (exact below that).
    """
    keys = list(keys) if keys is not None else list(store.keys)
    rng = np.random.default_rng(seed)
    out = {}
    n = store.n_steps
    if n == 0:
        raise StoreError(f"{store.path}: cannot compute statistics of an empty store")
    for k in keys:
        if k not in store.keys:
            raise StoreError(
                f"{store.path}: no key {k!r} to compute statistics of; the store has {sorted(store.keys)}"
            )
        if store.keys[k].dtype == "uint8" and len(store.keys[k].shape) == 3:
            idx = np.sort(rng.choice(n, size=min(n, 512), replace=False))
            x = np.asarray(store.array(k).get_orthogonal_selection((idx,)), dtype=np.float64) / 255.0
            x = x.reshape(-1, x.shape[-1])
        else:
            x = np.asarray(store.read(k), dtype=np.float64)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0]
            raise StoreError(f"{store.path}: key {k!r} has a non-finite value at step {bad[0]}")
        sub = x if len(x) <= max_rows else x[rng.choice(len(x), size=max_rows, replace=False)]
        out[k] = {
            "min": x.min(0),
            "max": x.max(0),
            "mean": x.mean(0),
            "std": x.std(0),
            "q01": np.quantile(sub, 0.01, axis=0),
            "q99": np.quantile(sub, 0.99, axis=0),
        }
        out[k] = {s: v.astype(np.float32) for s, v in out[k].items()}
    return out


def scaled_action_stats(
    stats: Mapping, dims: Iterable[int], factor: float = 10.0, key: str = "action"
) -> dict:
    """A copy of ``stats`` under which the action ``dims`` normalize to 1/``factor`` of their usual range.

    RTI-DP's "scale" remedy for a discrete gripper: trained so, the gripper lives in [-1/10, 1/10] of the
    normalized space, and the few low-noise reverse steps RTI runs from a warm start can still flip it
    (from +-1 they cannot). min/max and q01/q99 are widened ``factor``-fold about their centre, std is
    multiplied (the mean stays), so every normalization mode scales the same way. The statistics travel in
    the checkpoint's normalizer: inference un-normalizes with no other change.
    """
    if not factor > 0:
        raise ConfigError(f"action scale factor must be > 0, got {factor}")
    if key not in stats:
        raise ConfigError(f"statistics have no {key!r} key; keys: {sorted(stats)}")
    out = {k: {s: np.array(v, copy=True) for s, v in st.items()} for k, st in stats.items()}
    a = out[key]
    da = int(np.shape(a["min"])[-1])
    d = [int(i) for i in dims]
    bad = [i for i in d if not 0 <= i < da]
    if bad:
        raise ConfigError(f"action dims {bad} out of range for action dim {da}")
    for lo, hi in (("min", "max"), ("q01", "q99")):
        if lo in a and hi in a:
            c, h = (a[lo][d] + a[hi][d]) / 2, (a[hi][d] - a[lo][d]) / 2
            a[lo][d], a[hi][d] = c - factor * h, c + factor * h
    if "std" in a:
        a["std"][d] = a["std"][d] * factor
    return out


class Normalizer:
    """Maps raw values to the model's space and back, per key. Works on numpy arrays and torch tensors."""

    def __init__(self, stats: Mapping[str, Mapping[str, np.ndarray]], modes: Mapping[str, str]):
        for k, m in modes.items():
            if m not in MODES:
                raise ValueError(f"normalization mode for {k!r} must be one of {MODES}, got {m!r}")
            if m != "identity" and k not in stats:
                raise KeyError(
                    f"no normalizer statistics for key {k!r}; statistics exist for {sorted(stats)}"
                )
        self.modes = dict(modes)
        self.stats = {
            k: {s: np.asarray(v, dtype=np.float32) for s, v in d.items()}
            for k, d in stats.items()
            if k in modes
        }
        self._affine = {k: self._make_affine(k) for k in self.modes}
        self._torch_cache: dict = {}

    def _make_affine(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, offset) with normalized = raw * scale + offset."""
        mode = self.modes[key]
        if mode == "identity":
            return None
        st = self.stats[key]
        if mode == "meanstd":
            lo, span = st["mean"], st["std"]
            scale = np.where(span > _EPS, 1.0 / np.maximum(span, _EPS), 1.0)
            return scale.astype(np.float32), (-lo * scale).astype(np.float32)
        lo, hi = (st["min"], st["max"]) if mode == "minmax" else (st["q01"], st["q99"])
        span = hi - lo
        # constant dims map to 0 (scale 1 around their value), not to +-inf
        scale = np.where(span > _EPS, 2.0 / np.maximum(span, _EPS), 1.0)
        offset = np.where(span > _EPS, -1.0 - lo * scale, -lo)
        return scale.astype(np.float32), offset.astype(np.float32)

    def _params(self, key: str, like):
        if key not in self.modes:
            raise KeyError(f"normalizer has no key {key!r}; it has {sorted(self.modes)}")
        aff = self._affine[key]
        if aff is None or isinstance(like, np.ndarray):
            return aff
        ck = (key, like.device, like.dtype)
        if ck not in self._torch_cache:
            import torch

            self._torch_cache[ck] = tuple(
                torch.as_tensor(a, device=like.device, dtype=like.dtype) for a in aff
            )
        return self._torch_cache[ck]

    def normalize(self, key: str, x):
        aff = self._params(key, x)
        return x if aff is None else x * aff[0] + aff[1]

    def unnormalize(self, key: str, x):
        aff = self._params(key, x)
        return x if aff is None else (x - aff[1]) / aff[0]

    def to_dict(self) -> dict:
        return {
            "modes": dict(self.modes),
            "stats": {k: {s: v.tolist() for s, v in d.items()} for k, d in self.stats.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Normalizer:
        stats = {
            k: {s: np.asarray(v, dtype=np.float32) for s, v in st.items()} for k, st in d["stats"].items()
        }
        return cls(stats, d["modes"])
