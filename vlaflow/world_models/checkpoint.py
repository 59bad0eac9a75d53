"""World-model checkpoints: the policies' directory layout (JSON + safetensors, never pickles) with format
``vlaflow.world_model``::

    DIR/config.json        {"format": "vlaflow.world_model", "version", "config", "extra"}
    DIR/model.safetensors  the module's state dict
    DIR/normalizer.json    Normalizer.to_dict()
    (DIR/train_state.*     the training loop's resume state, when written by ``vlaflow train-wm``)
    (DIR/success_classifier.safetensors + .json   the success classifier head and the reward choice,
                           when trained: :func:`save_success_classifier`)

The imagined env's reward (:func:`imagined_reward`) is ``coverage`` (the task's own, from the predicted state)
or ``classifier`` (the success classifier's p(success | state)); by default the one the checkpoint records
(``success_classifier.json``'s ``reward``; ``coverage`` when there is no classifier).

Written by :func:`vlaflow.policies.checkpoint.write_checkpoint_files` (the model declares its
``checkpoint_format``), so the one training loop's checkpoints of a world model load here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.checkpoint import check_counts, save_checkpoint
from vlaflow.world_models.config import WorldModelConfig
from vlaflow.world_models.model import DiffusionWorldModel
from vlaflow.world_models.reward import RewardFn, SuccessClassifier, task_reward

FORMAT, VERSION = DiffusionWorldModel.checkpoint_format, 1
CONFIG_FILE, MODEL_FILE, NORMALIZER_FILE = "config.json", "model.safetensors", "normalizer.json"
CLASSIFIER_FILE, CLASSIFIER_META = "success_classifier.safetensors", "success_classifier.json"
REWARDS = ("coverage", "classifier")  # the imagined env's reward choices


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


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_success_classifier(
    directory: str | os.PathLike, clf: SuccessClassifier, info: dict, reward: str = "classifier"
) -> None:
    """Put the success classifier head into the world-model checkpoint ``directory`` (beside its files) and
    record ``reward`` as the checkpoint's default imagined reward; ``info`` (data, AUROC, ...) is kept."""
    d = Path(directory)
    read_world_model_meta(d)
    if reward not in REWARDS:
        raise VlaflowError(f"reward must be one of {REWARDS}, got {reward!r}")
    meta = {"reward": reward, "obs_dim": clf.obs_dim, "width": clf.width, **info}
    state = {k: v.detach().contiguous() for k, v in clf.state_dict().items()}
    _write_atomic(d / CLASSIFIER_FILE, lambda p: save_file(state, str(p)))
    _write_atomic(d / CLASSIFIER_META, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_success_classifier(directory: str | os.PathLike) -> tuple[SuccessClassifier, dict] | None:
    """The checkpoint's success classifier and its record, or None when it has none."""
    d = Path(directory)
    if not (d / CLASSIFIER_META).is_file():
        return None
    meta = json.loads((d / CLASSIFIER_META).read_text())
    state = load_file(str(d / CLASSIFIER_FILE))
    for k, v in state.items():
        if not bool(torch.isfinite(v).all()):
            raise VlaflowError(f"{d / CLASSIFIER_FILE}: weight {k} has NaN/inf values; refused")
    dim = int(meta["obs_dim"])
    clf = SuccessClassifier(dim, np.zeros(dim), np.ones(dim), width=int(meta["width"]))
    clf.load_state_dict(state)
    return clf.eval(), meta


def imagined_reward(
    directory: str | os.PathLike, task: str, choice: str | None = None
) -> tuple[str, RewardFn]:
    """(name, reward function of predicted states) for the imagined env of the checkpoint at ``directory``:
    ``choice`` "coverage" (the task's own), "classifier" (its success classifier) or None (as recorded)."""
    found = load_success_classifier(directory)
    if choice is None:
        choice = found[1].get("reward", "classifier") if found is not None else "coverage"
    if choice not in REWARDS:
        raise VlaflowError(f"imagined reward must be one of {REWARDS}, got {choice!r}")
    if choice == "coverage":
        return choice, task_reward(task)
    if found is None:
        raise VlaflowError(
            f"world model {directory} has no success classifier (train one: vlaflow train-wm "
            "--success-classifier); its reward can be 'coverage' only"
        )
    return choice, found[0].reward
