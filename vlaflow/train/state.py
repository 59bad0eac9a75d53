"""Training checkpoints: a policy checkpoint directory plus the state needed to resume, without pickle.

Layout of one checkpoint directory::

    config.json, model.safetensors, normalizer.json   the policy's own files (EMA weights when EMA is on):
                                                       ``vlaflow.load_policy(dir)`` loads them for inference
    train_state.safetensors                           raw (non-EMA) weights "model/<name>" and AdamW moments
                                                       "optim/<param index>/<name>"; when the trained module
                                                       is more than the deployed policy (RL critics), its EMA
                                                       "ema/<name>"; an objective's own "objective/<name>"
    train_state.json                                  step, seed, best score, elapsed time, run config

The learning rate is a pure function of the step and the RNG is derived from (seed, step) (see
:mod:`vlaflow.train.schedule`), so neither a scheduler nor RNG state needs storing.
Directories are written beside their destination and renamed into place, so a kill mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlaflow.atomic import atomic_directory, recover_directory
from vlaflow.errors import VlaflowError
from vlaflow.policies.checkpoint import write_checkpoint_files

TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
FORMAT = "vlaflow.train_state"
VERSION = 1


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW per-parameter state as flat named tensors (parameter index = order in param_groups)."""
    out = {}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"optim/{idx}/{name}"] = t.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore :func:`optimizer_tensors` into a freshly built optimizer over the same parameters."""
    sd = opt.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if not key.startswith("optim/"):
            continue
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = t
    if state and max(state) >= n_params:
        raise VlaflowError(
            f"optimizer state has parameter {max(state)} but the model has {n_params} parameters"
        )
    sd["state"] = state
    opt.load_state_dict(sd)


def save_training_checkpoint(
    dest: Path,
    deploy_policy: torch.nn.Module,
    raw_policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint at ``dest`` atomically (temp dir + rename); ``extra`` tensors join the
    resume state under their own (prefixed) names."""
    dest = Path(dest)
    with atomic_directory(dest, overwrite=True) as tmp:
        write_checkpoint_files(tmp, deploy_policy)
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in raw_policy.state_dict().items()}
        tensors.update(optimizer_tensors(optimizer))
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(tmp / TRAIN_STATE_TENSORS))
        state_doc = {"format": FORMAT, "version": VERSION, **state}
        (tmp / TRAIN_STATE_JSON).write_text(json.dumps(state_doc, indent=1))
    return dest


def write_state_json(ckpt: Path, state: dict) -> None:
    """Rewrite a checkpoint's train_state.json (atomically) after an evaluation updated the bookkeeping."""
    path = Path(ckpt) / TRAIN_STATE_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **state}, indent=1))
    os.replace(tmp, path)


def copy_checkpoint(src: Path, dest: Path) -> Path:
    """Copy a checkpoint directory atomically (used for checkpoints/best)."""
    dest = Path(dest)
    with atomic_directory(dest, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dest


def recover_checkpoint(dest: Path) -> Path:
    """``dest`` itself, or -- after a kill between the two renames of a save -- the complete previous
    checkpoint left beside it (renamed back into place). Half-written temp dirs are removed."""
    return recover_directory(dest)


def read_train_state(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(train_state.json contents, train_state.safetensors tensors) of a training checkpoint."""
    ckpt = Path(ckpt)
    js, st = ckpt / TRAIN_STATE_JSON, ckpt / TRAIN_STATE_TENSORS
    for p in (js, st):
        if not p.exists():
            raise VlaflowError(f"{ckpt}: not a resumable training checkpoint (missing {p.name})")
    state = json.loads(js.read_text())
    if state.get("format") != FORMAT:
        raise VlaflowError(f"{js}: format is {state.get('format')!r}, expected {FORMAT!r}")
    return state, load_file(str(st))


def load_raw_weights(policy: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    own = policy.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise VlaflowError(
            f"{where}: saved weights do not fit the model (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise VlaflowError(
            f"{where}: weight {k} has shape {tuple(sd[k].shape)}, model has {tuple(own[k].shape)}"
        )
    policy.load_state_dict(sd)
