"""Training: configs and presets, the one loop (AdamW, EMA, DDP, resume) and its objectives.

``from vlaflow.train import train, RunConfig, get_preset`` — heavy imports (torch) happen on first use.
The loop is :mod:`vlaflow.train.loop`; objectives (behaviour cloning, one-step distillation) are in
:mod:`vlaflow.train.objectives`. The command line (``vlaflow train | demo | distill``) is in
:mod:`vlaflow.cli`.
"""

from __future__ import annotations

__all__ = ["RunConfig", "TrainConfig", "DataConfig", "EvalConfig", "apply_overrides", "get_preset", "train"]


def __getattr__(name: str):
    if name in ("RunConfig", "TrainConfig", "DataConfig", "EvalConfig", "apply_overrides"):
        from vlaflow.train import config

        return getattr(config, name)
    if name == "get_preset":
        from vlaflow.train.presets import get_preset

        return get_preset
    if name == "train":
        from vlaflow.train.trainer import train

        return train
    raise AttributeError(name)
