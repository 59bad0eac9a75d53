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

Only ``checkpoints/last`` carries ``train_state.safetensors``: step checkpoints and ``best`` are shareable
policy checkpoints (config, weights, normalizer, and ``train_state.json`` for the record, marked
``"resume_state": false``). When ``last`` is damaged, :func:`find_resume_point` falls back to the newest
intact step checkpoint: its weights restart both the trained and the EMA copy, and AdamW's moments restart
from zero (an approximate continuation, said so when it happens).
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

from vlaflow.atomic import OLD_TAG, TMP_TAG, atomic_directory, recover_directory
from vlaflow.errors import VlaflowError
from vlaflow.policies.checkpoint import MODEL_FILE, share_files, write_checkpoint_files

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
        share_files(tmp)
    return dest


def write_state_json(ckpt: Path, state: dict) -> None:
    """Rewrite a checkpoint's train_state.json (atomically) after an evaluation updated the bookkeeping."""
    path = Path(ckpt) / TRAIN_STATE_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **state}, indent=1))
    os.replace(tmp, path)


def copy_checkpoint(src: Path, dest: Path, *, resume_state: bool = False) -> Path:
    """Copy a checkpoint directory atomically (step checkpoints, checkpoints/best): without the optimizer
    and raw-weight resume state unless ``resume_state``, so it can be shared as a policy."""
    dest = Path(dest)
    skip = () if resume_state else (TRAIN_STATE_TENSORS,)
    with atomic_directory(dest, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip))
        js = tmp / TRAIN_STATE_JSON
        if not resume_state and js.is_file():
            doc = json.loads(js.read_text())
            js.write_text(json.dumps({**doc, "resume_state": False}, indent=1))
    return dest


def clean_leftovers(ckpt_dir: Path) -> list[Path]:
    """Remove the hidden temp/old directories a kill inside a save left in ``ckpt_dir`` (a writer's own
    restart only: call it before this run writes again). ``last`` is first recovered if a kill fell between
    the two renames. Returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    recover_checkpoint(ckpt_dir / "last")
    removed = []
    for p in sorted(ckpt_dir.glob(".*")):
        if p.is_dir() and (TMP_TAG in p.name or OLD_TAG in p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _intact(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """(state, tensors) of a checkpoint that reads completely, else why not."""
    try:
        if not (ckpt / TRAIN_STATE_JSON).is_file():
            return f"no {TRAIN_STATE_JSON}"
        state = json.loads((ckpt / TRAIN_STATE_JSON).read_text())
        if state.get("format") != FORMAT:
            return f"{TRAIN_STATE_JSON} has format {state.get('format')!r}"
        load_file(str(ckpt / MODEL_FILE))
        tensors = load_file(str(ckpt / TRAIN_STATE_TENSORS)) if (ckpt / TRAIN_STATE_TENSORS).is_file() else {}
        if state.get("resume_state", True) and not tensors:
            return f"no {TRAIN_STATE_TENSORS}"
        return state, tensors
    except Exception as e:  # any damage (truncated, garbled) makes it not a resume point
        return f"{type(e).__name__}: {e}"


def find_resume_point(ckpt_dir: Path) -> tuple[Path, dict, dict[str, torch.Tensor], list[str]]:
    """(checkpoint, state, tensors, notes): ``last`` when it reads completely, else the newest intact
    ``step_N``; ``notes`` say what was skipped and why. Nothing intact is an error listing each one."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last", *sorted(ckpt_dir.glob("step_*"), reverse=True)]
    notes = []
    for c in candidates:
        if not c.is_dir():
            continue
        got = _intact(c)
        if isinstance(got, tuple):
            return c, got[0], got[1], notes
        notes.append(f"{c.name}: {got}")
    found = "; ".join(notes) if notes else "no checkpoints"
    raise VlaflowError(f"{ckpt_dir.parent}: nothing to resume ({found})")


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
