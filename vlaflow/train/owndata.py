"""Training on your own data without a task preset: a run config inferred from the store's schema.

``vlaflow train --family diffusion|flow|ebt|vla --data STORE --out RUN`` builds its config here:

* observation keys: every ``obs.*`` key of the store that the family's observation encoder can take --
  low-dim numeric keys (concatenated, any per-step shape up to :data:`MAX_LOWDIM` values) and cameras
  ``obs.image.<camera>`` stored as uint8 (h, w, 3) (ResNet-18 GN + spatial softmax, random crop of 90%);
  the shapes, the action dimension and the fps are the store's, so the checkpoint's match the store;
* the network: the family's PushT low-dim preset (a U-Net of 64/128/256 channels for diffusion and flow,
  the 3-layer energy transformer for EBT), sized for CPU minutes; ``vla``: the VLM-prefix policy's
  defaults (the assembled SmolLM2-135M + frozen EfficientNet-Lite0 backbone, frozen, To = 1), conditioned
  on the store's episode instructions (``policy.backbone=vlm policy.backbone_path=DIR`` for a local VLM);
* no sim evaluation: a tenth of the episodes (at least one) is held out and scored by
  :mod:`vlaflow.train.validation` (validation loss and action errors, a plot) every ``train.eval_every``
  steps and at the end.

Everything stays overridable by ``field=value`` (``data.obs_keys=[obs.state]``, ``data.horizon=32``,
``train.steps=20000``, ...), and ``--preset NAME`` is still the way to start from a preset instead.
"""

from __future__ import annotations

import math

import numpy as np

import vlaflow.keys as K
from vlaflow.errors import ConfigError
from vlaflow.train.config import RunConfig
from vlaflow.train.presets import PRESET_DATA, _build

FAMILIES = ("diffusion", "flow", "ebt", "vla")
MAX_LOWDIM = 1024  # more values per step than this is not a state vector (an image or a point cloud?)

_START = {"diffusion": "pusht_lowdim_diffusion", "flow": "pusht_lowdim_flow", "ebt": "pusht_lowdim_ebt"}
_TRAIN = {
    "steps": 3000,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 100,
    "eval_every": 500,
    "ckpt_every": 500,
    "log_every": 50,
    "eval_episodes": 1,
}
_TRAIN_EBT = {**_TRAIN, "lr": 3e-4, "warmup_steps": 200}  # the EBT preset's (second-order steps)
_TRAIN_VLA = {**_TRAIN, "lr": 1e-4, "batch_size": 16}  # a 135M-parameter prefix per sample: small batches


def why_not_encodable(key: str, spec) -> str | None:
    """Why the observation encoders cannot take store key ``key`` (None: they can)."""
    dt = np.dtype(spec.dtype)
    shape = tuple(spec.shape)
    if K.is_image(key):
        if dt != np.uint8 or len(shape) != 3 or shape[-1] != 3:
            return f"a camera key must be uint8 (h, w, 3); it is {dt.name} {shape}"
        if min(shape[:2]) < 32:
            return f"images of {shape[0]}x{shape[1]} px are too small for the ResNet-18 encoder (>= 32 px)"
        return None
    if dt.kind not in "fiub":
        return f"dtype {dt.name} is not numeric"
    n = math.prod(shape) if shape else 1
    if n > MAX_LOWDIM:
        return (
            f"{n} values per step {shape} is too many for the low-dim state encoder (<= {MAX_LOWDIM}); "
            "a camera belongs under obs.image.<camera> as uint8 (h, w, 3)"
        )
    return None


def _found(store) -> str:
    return ", ".join(f"{k} {store.keys[k].dtype} {tuple(store.keys[k].shape)}" for k in sorted(store.keys))


def check_keys(store, obs_keys, where: str, family: str) -> None:
    """The store has an action key the policy can predict and each of ``obs_keys`` is one the ``family``
    can encode; otherwise an error naming what the store has."""
    if K.ACTION not in store.keys:
        raise ConfigError(
            f"{where}: the store has no {K.ACTION!r} key, so there is nothing to learn to predict; it has "
            f"{_found(store)} (ingest with --key-map SOURCE=action to name the action array)"
        )
    a = store.keys[K.ACTION]
    if len(a.shape) != 1 or np.dtype(a.dtype).kind not in "fiu":
        raise ConfigError(
            f"{where}: {K.ACTION!r} must be a numeric vector per step (Da,); it is {a.dtype} {tuple(a.shape)}"
        )
    bad = {k: why_not_encodable(k, store.keys[k]) for k in obs_keys if k in store.keys}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise ConfigError(
            f"{where}: the {family} policy cannot encode "
            + "; ".join(f"{k}: {v}" for k, v in bad.items())
            + f". The store has {_found(store)}; choose others with data.obs_keys=[...]"
        )


def infer_obs_keys(store, where: str, family: str = "diffusion") -> list[str]:
    """The store's observation keys the family can encode (state first, then cameras), or an error that
    lists every key found and why each was left out."""
    check_keys(store, [], where, family)
    obs = [k for k in store.keys if k.startswith(K.OBS_PREFIX)]
    usable = [k for k in obs if why_not_encodable(k, store.keys[k]) is None]
    if not usable:
        why = "; ".join(f"{k}: {why_not_encodable(k, store.keys[k])}" for k in obs) or "no obs.* keys at all"
        raise ConfigError(
            f"{where}: no observation key the {family} policy can encode ({why}); the store has "
            f"{_found(store)}"
        )
    lowdim = sorted(k for k in usable if not K.is_image(k))
    return lowdim + sorted(k for k in usable if K.is_image(k))


def own_data_config(family: str, store, where: str) -> RunConfig:
    """The run config of ``family`` for ``store`` (see the module docstring); overrides go on top."""
    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    keys = infer_obs_keys(store, where, family)
    policy = {k: v for k, v in PRESET_DATA[_START[family]]["policy"].items()} if family in _START else {}
    policy["obs_shapes"] = {k: list(store.keys[k].shape) for k in keys}
    policy["action_dim"] = int(store.keys[K.ACTION].shape[-1])
    if store.fps:
        policy["fps"] = float(store.fps)
    images = [k for k in keys if K.is_image(k)]
    if images and family != "vla":  # (the VLA prefix takes whole frames through its own image path)
        h, w = (min(store.keys[k].shape[i] for k in images) for i in (0, 1))
        policy["encoder"] = {
            **policy.get("encoder", {}),
            "image_backbone": "resnet18",
            "crop_shape": [int(round(0.9 * h)), int(round(0.9 * w))],
        }
    windows = {"n_obs_steps": 1 if family == "vla" else 2, "horizon": 16, "n_action_steps": 8}
    policy.update(windows)
    d = {
        "about": f"{family} on {where} (keys and shapes from the store, held-out validation)",
        "family": family,
        "policy": policy,
        "train": {"ebt": _TRAIN_EBT, "vla": _TRAIN_VLA}.get(family, _TRAIN),
        "data": {"obs_keys": keys, **windows, "val_ratio": 0.1},
        "eval": {"task": ""},
    }
    return _build(f"own_data_{family}", d)
