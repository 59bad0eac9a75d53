"""Policy checkpoints as directories, never pickles::

    DIR/config.json        {"format", "version", "config": cfg.to_dict(), "extra": extra_json}
    DIR/model.safetensors  the module's state dict
    DIR/normalizer.json    Normalizer.to_dict() (modes + statistics)
    DIR/extra.safetensors  optional tensors (the trainer's optimizer / EMA state)
    DIR/text_encoder/      tokenizer + architecture of a user-given local text model (weights are above)

Written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under ``DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlaflow.atomic import atomic_directory
from vlaflow.errors import VlaflowError
from vlaflow.policies.composed.config import PARENT_FAMILIES
from vlaflow.policies.registry import build_policy, policy_config_from_dict

TEXT_ENCODER_DIR = "text_encoder"
FORMAT = "vlaflow.policy"
VERSION = 1
CONFIG_FILE, MODEL_FILE, NORMALIZER_FILE, EXTRA_FILE = (
    "config.json",
    "model.safetensors",
    "normalizer.json",
    "extra.safetensors",
)


def _tensors_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; copies are cheap at this size.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    directory: str | os.PathLike,
    policy,
    *,
    extra_json: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``policy`` (config, weights, normalizer) and optional resume state to ``directory``, atomically
    (a complete checkpoint replaces an existing one; a crash leaves the old one)."""
    dest = Path(directory)
    with atomic_directory(dest, overwrite=True) as tmp:
        write_checkpoint_files(tmp, policy, extra_json=extra_json, extra_tensors=extra_tensors)
    return dest


def write_checkpoint_files(
    directory: Path,
    policy,
    *,
    extra_json: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """The checkpoint's files into an existing (temporary) ``directory``; :func:`save_checkpoint` is the
    atomic whole-directory write built on it."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": policy.config.to_dict(),
        "extra": extra_json or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    (directory / NORMALIZER_FILE).write_text(json.dumps(policy.normalizer.to_dict()))
    save_file(_tensors_for_save(policy.state_dict()), str(directory / MODEL_FILE))
    text = getattr(policy, "text_encoder", None)
    if text is not None and text.pretrained_path:
        # A user's local text model: keep its tokenizer and architecture inside the checkpoint.
        text.save_architecture(directory / TEXT_ENCODER_DIR)
    if extra_tensors:
        save_file(_tensors_for_save(extra_tensors), str(directory / EXTRA_FILE))


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise VlaflowError(f"{directory}: not a policy checkpoint (no {CONFIG_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise VlaflowError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise VlaflowError(
            f"{path}: checkpoint version {meta.get('version')} is newer than supported {VERSION}"
        )
    return meta


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the policy saved in ``directory`` (safetensors + JSON only; never unpickles)."""
    d = Path(directory)
    meta = read_checkpoint_meta(d)
    cfg = policy_config_from_dict(meta["config"])
    norm_path = d / NORMALIZER_FILE
    if not norm_path.is_file():
        raise VlaflowError(f"{d}: missing {NORMALIZER_FILE}")
    norm = json.loads(norm_path.read_text())
    stats = {
        k: {s: np.asarray(v, dtype=np.float32) for s, v in st.items()} for k, st in norm["stats"].items()
    }
    build_cfg = cfg
    if (
        cfg.encoder.language.enabled
        and cfg.encoder.language.pretrained_path
        and (d / TEXT_ENCODER_DIR).is_dir()
    ):
        lang = dataclasses.replace(cfg.encoder.language, pretrained_path=str(d / TEXT_ENCODER_DIR))
        build_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, language=lang))
    policy = build_policy(build_cfg, stats)
    policy.config = cfg  # the saved config, not the checkpoint-local text-encoder path
    saved_modes = norm.get("modes", {})
    if saved_modes != policy.normalizer.modes:
        raise VlaflowError(
            f"{norm_path}: modes {saved_modes} differ from the config's {policy.normalizer.modes}"
        )
    model_path = d / MODEL_FILE
    if not model_path.is_file():
        raise VlaflowError(f"{d}: missing {MODEL_FILE}")
    state = load_file(str(model_path))
    result = policy.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlaflowError(
            f"{model_path}: weights do not match the config; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return policy.to(device).eval()


def load_checkpoint_extras(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``extra_json`` and ``extra_tensors`` given to :func:`save_checkpoint` (empty when absent)."""
    d = Path(directory)
    meta = read_checkpoint_meta(d)
    tensors = load_file(str(d / EXTRA_FILE)) if (d / EXTRA_FILE).is_file() else {}
    return meta.get("extra", {}), tensors


def load_parents(paths, device: str | torch.device = "cpu") -> list:
    """GPC parents from checkpoint directories, refusing any family a composite cannot mix up front.

    (Here rather than in ``composed/``: loading needs the family registry, which imports ``composed/``.)
    """
    out = []
    for p in paths:
        fam = read_checkpoint_meta(p).get("config", {}).get("family")
        if fam not in PARENT_FAMILIES:
            raise VlaflowError(f"{p}: a {fam!r} checkpoint; GPC parents must be {PARENT_FAMILIES}")
        out.append(load_checkpoint(p, device=device))
    return out
