"""World-model checkpoints: the policies' directory layout (JSON + safetensors, never pickles) with format
``vlaflow.world_model``::

    DIR/config.json        {"format": "vlaflow.world_model", "version", "config", "extra"}
    DIR/model.safetensors  the module's state dict
    DIR/normalizer.json    Normalizer.to_dict()
    (DIR/train_state.*     the training loop's resume state, when written by ``vlaflow train-wm``)

Written by :func:`vlaflow.policies.checkpoint.write_checkpoint_files` (the model declares its
``checkpoint_format``), so the one training loop's checkpoints of a world model load here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.checkpoint import check_counts, save_checkpoint
from vlaflow.world_models.config import WorldModelConfig
from vlaflow.world_models.model import DiffusionWorldModel

FORMAT, VERSION = DiffusionWorldModel.checkpoint_format, 1
CONFIG_FILE, MODEL_FILE, NORMALIZER_FILE = "config.json", "model.safetensors", "normalizer.json"


def save_world_model(
    directory: str | os.PathLike, model: DiffusionWorldModel, extra: dict | None = None
) -> Path:
    return save_checkpoint(directory, model, extra_json=extra)


def read_world_model_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise VlaflowError(f"{directory}: not a world-model checkpoint (no {CONFIG_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise VlaflowError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise VlaflowError(f"{path}: version {meta.get('version')} is newer than supported {VERSION}")
    return meta


def load_world_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionWorldModel:
    d = Path(directory)
    meta = read_world_model_meta(d)
    check_counts(meta.get("config"), str(d / CONFIG_FILE))
    cfg = WorldModelConfig.from_dict(meta["config"])
    norm = Normalizer.from_dict(json.loads((d / NORMALIZER_FILE).read_text()))
    for k, st in norm.stats.items():
        for s, v in st.items():
            if not np.all(np.isfinite(v)):
                raise VlaflowError(f"{d / NORMALIZER_FILE}: statistic {k}.{s} is not finite; refused")
    model = DiffusionWorldModel(cfg, norm)
    state = load_file(str(d / MODEL_FILE))
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise VlaflowError(f"{d / MODEL_FILE}: weight {k} has NaN/inf values; refused")
    res = model.load_state_dict(state, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise VlaflowError(
            f"{d / MODEL_FILE}: weights do not match the config; missing {res.missing_keys[:5]}, "
            f"unexpected {res.unexpected_keys[:5]}"
        )
    return model.to(device).eval()
