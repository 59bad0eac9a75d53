"""Policy checkpoints as directories, never pickles::

    DIR/config.json        {"format", "version", "config": cfg.to_dict(), "extra": extra_json}
    DIR/model.safetensors  the module's state dict
    DIR/normalizer.json    Normalizer.to_dict() (modes + statistics)
    DIR/extra.safetensors  optional tensors (the trainer's optimizer / EMA state)
    DIR/text_encoder/      tokenizer + architecture of a user-given local text model (weights are above)
    DIR/backbone/          a VLA policy's backbone: tokenizer, architecture, vocabulary fingerprint (weights
                           are in model.safetensors)

Written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under ``DIR``.

Loading treats a checkpoint as untrusted input (it may come from anyone):

* nothing reaches an unpickler: JSON and safetensors only; ``text_encoder/`` may hold only tokenizer and
  architecture files (``.json``, ``.txt``, ``.model``), never weights of its own (they are in
  ``model.safetensors``) and never pickles;
* no path from the config is followed outside ``DIR``: a language model's ``pretrained_path`` is rebound
  to ``DIR/text_encoder`` (a config naming a text model without that directory is refused), a VLA
  policy's ``backbone_path`` to ``DIR/backbone`` (same files rule; its vocabulary is checked against the
  fingerprint recorded there), entries may
  not be links leading out of ``DIR``; other paths in a config (a distilled student's ``teacher``, a GPC
  search's table) are provenance and never opened;
* a config asking for an absurd network is refused before any weight is allocated: the policy is first
  built on torch's ``meta`` device (no memory) and its parameter count checked against
  ``max_params`` / ``$VLAFLOW_MAX_PARAMS`` (default :data:`DEFAULT_MAX_PARAMS`), after depth-like counts
  (layers, blocks, heads, list lengths) were checked against :data:`MAX_COUNT`;
* weights and normalizer statistics must be finite (a NaN there would turn every action into NaN).
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
from vlaflow.policies.vla.backbone import BACKBONE_FILE_SUFFIXES

TEXT_ENCODER_DIR = "text_encoder"
BACKBONE_DIR = "backbone"
TEXT_ENCODER_SUFFIXES = (".json", ".txt", ".model")  # tokenizer + architecture files: no code, no pickle
MAX_PARAMS_ENV = "VLAFLOW_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 1_000_000_000  # 4 GB of float32 weights; vlaflow's policies are < 100M
FORMAT = "vlaflow.policy"
VERSION = 1
CONFIG_FILE, MODEL_FILE, NORMALIZER_FILE, EXTRA_FILE = (
    "config.json",
    "model.safetensors",
    "normalizer.json",
    "extra.safetensors",
)


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share_files(directory: str | os.PathLike) -> None:
    """Give the files under ``directory`` ordinary permissions (0666 less the umask): safetensors writes
    0600, which would keep a checkpoint from the rest of a team sharing a machine or a volume."""
    mode = 0o666 & ~_umask()
    for p in Path(directory).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


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
        # a non-policy model on the same files (the world model) names its own format, so the training
        # loop's checkpoints of it load with its own loader and are refused by the policy loader
        "format": getattr(policy, "checkpoint_format", FORMAT),
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
    save_backbone = getattr(policy, "save_backbone_files", None)
    if save_backbone is not None:  # a VLA policy: its backbone's tokenizer + architecture
        save_backbone(directory / BACKBONE_DIR)
    if extra_tensors:
        save_file(_tensors_for_save(extra_tensors), str(directory / EXTRA_FILE))
    share_files(directory)


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


def _confined(d: Path, p: Path, what: str) -> Path:
    """``p`` (inside checkpoint ``d``), refusing a link or a name that leads outside ``d``."""
    root, real = d.resolve(), p.resolve()
    if real != root and root not in real.parents:
        raise VlaflowError(f"{p}: {what} leads outside the checkpoint directory {d} (to {real}); refused")
    return p


def _check_files_dir(
    d: Path, name: str, suffixes: tuple[str, ...] = TEXT_ENCODER_SUFFIXES, what: str = "the text model"
) -> Path:
    """``d/name``, holding only tokenizer / architecture files (``suffixes``), nothing leading outside."""
    sub = _confined(d, d / name, name)
    for f in sorted(sub.rglob("*")):
        _confined(d, f, f"an entry of {name}/")
        if f.is_file() and f.suffix not in suffixes:
            raise VlaflowError(
                f"{f}: a checkpoint's {name}/ holds only tokenizer and architecture files "
                f"({', '.join(suffixes)}); {what}'s weights are in {MODEL_FILE}. "
                "Refused (weights or pickles here would be loaded by transformers)"
            )
    return sub


def max_params_limit(max_params: int | None = None) -> int:
    """The parameter-count limit of :func:`load_checkpoint`: the argument, else $VLAFLOW_MAX_PARAMS."""
    if max_params is not None:
        return int(max_params)
    raw = os.environ.get(MAX_PARAMS_ENV, "")
    try:
        return int(float(raw)) if raw else DEFAULT_MAX_PARAMS
    except ValueError:
        raise VlaflowError(f"${MAX_PARAMS_ENV}={raw!r} is not a number of parameters") from None


MAX_COUNT = 4096  # layers / blocks / heads / levels: each builds a Python module, even on the meta device
_COUNT_SUFFIXES = ("layers", "blocks", "heads", "candidates")


def check_counts(config: Any, where: str, path: str = "") -> None:
    """Refuse depth-like fields (``n_layers``, ``n_blocks``, ``num_heads``, list lengths such as
    ``down_dims``) above :data:`MAX_COUNT` before anything is built: the meta-device estimate bounds the
    memory of the weights, not the time and memory of constructing 10^9 module objects."""
    if isinstance(config, dict):
        for k, v in config.items():
            name = f"{path}{k}"
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and str(k).endswith(_COUNT_SUFFIXES) and v > MAX_COUNT:
                raise VlaflowError(f"{where}: {name}={v} is over the limit of {MAX_COUNT}; refused")
            if isinstance(v, list) and len(v) > MAX_COUNT:
                raise VlaflowError(f"{where}: {name} has {len(v)} entries, over {MAX_COUNT}; refused")
            check_counts(v, where, name + ".")
    elif isinstance(config, list):
        for i, v in enumerate(config):
            check_counts(v, where, f"{path}{i}.")


def estimate_parameters(cfg, stats: dict) -> int:
    """Parameters + buffers of the policy ``cfg`` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        probe = build_policy(cfg, stats)
    return sum(t.numel() for t in probe.parameters()) + sum(t.numel() for t in probe.buffers())


def _finite_stats(norm_path: Path, stats: dict) -> None:
    for k, st in stats.items():
        for s, v in st.items():
            if not np.all(np.isfinite(v)):
                raise VlaflowError(f"{norm_path}: statistic {k}.{s} is not finite ({v.ravel()[:6]}); refused")


def _finite_weights(model_path: Path, state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise VlaflowError(f"{model_path}: weight {k} has {n} NaN/inf value(s); refused")


def load_checkpoint(
    directory: str | os.PathLike, device: str | torch.device = "cpu", *, max_params: int | None = None
):
    """Rebuild the policy saved in ``directory`` (safetensors + JSON only; never unpickles; see the
    module docstring for what an untrusted checkpoint is checked for). ``max_params`` overrides the
    network-size limit ($VLAFLOW_MAX_PARAMS)."""
    d = Path(directory)
    meta = read_checkpoint_meta(d)
    check_counts(meta.get("config"), str(d / CONFIG_FILE))
    cfg = policy_config_from_dict(meta["config"])
    norm_path = _confined(d, d / NORMALIZER_FILE, NORMALIZER_FILE)
    if not norm_path.is_file():
        raise VlaflowError(f"{d}: missing {NORMALIZER_FILE}")
    norm = json.loads(norm_path.read_text())
    stats = {
        k: {s: np.asarray(v, dtype=np.float32) for s, v in st.items()} for k, st in norm["stats"].items()
    }
    _finite_stats(norm_path, stats)
    build_cfg = cfg
    lang_cfg = cfg.encoder.language
    if lang_cfg.enabled and (lang_cfg.pretrained_path or lang_cfg.text_encoder != "tiny_bert"):
        # the config's path is where the text model came from on the machine that trained; a checkpoint
        # loads only its own copy (tokenizer + architecture; the weights are in model.safetensors)
        if not (d / TEXT_ENCODER_DIR).is_dir():
            raise VlaflowError(
                f"{d}: the config names a text model at {cfg.encoder.language.pretrained_path!r}, but the "
                f"checkpoint has no {TEXT_ENCODER_DIR}/; paths outside a checkpoint are never followed"
            )
        te = _check_files_dir(d, TEXT_ENCODER_DIR)
        lang = dataclasses.replace(cfg.encoder.language, pretrained_path=str(te))
        build_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, language=lang))
    if any(f.name == "backbone_path" for f in dataclasses.fields(cfg)):
        # a VLA policy: its backbone is rebuilt from the checkpoint's own copy (never cfg.backbone_path)
        if not (d / BACKBONE_DIR).is_dir():
            raise VlaflowError(
                f"{d}: a {cfg.family} policy checkpoint needs its {BACKBONE_DIR}/ (the backbone's tokenizer "
                "and architecture); paths outside a checkpoint are never followed"
            )
        bdir = _check_files_dir(d, BACKBONE_DIR, BACKBONE_FILE_SUFFIXES, "the backbone")
        build_cfg = dataclasses.replace(build_cfg, backbone_path=str(bdir))
    limit = max_params_limit(max_params)
    n_params = estimate_parameters(build_cfg, stats)
    if n_params > limit:
        raise VlaflowError(
            f"{d / CONFIG_FILE}: the config describes a network of {n_params:,} parameters, over the limit "
            f"of {limit:,}; refused before allocating it (raise the limit with ${MAX_PARAMS_ENV} or "
            "max_params= if the checkpoint is trusted)"
        )
    model_path = _confined(d, d / MODEL_FILE, MODEL_FILE)
    if not model_path.is_file():
        raise VlaflowError(f"{d}: missing {MODEL_FILE}")
    from vlaflow.policies.nets.pretrained import weights_from_checkpoint

    with weights_from_checkpoint():  # pretrained trunks: their weights are in model.safetensors below
        policy = build_policy(build_cfg, stats)
    policy.config = cfg  # the saved config, not the checkpoint-local text-encoder path
    saved_modes = norm.get("modes", {})
    if saved_modes != policy.normalizer.modes:
        raise VlaflowError(
            f"{norm_path}: modes {saved_modes} differ from the config's {policy.normalizer.modes}"
        )
    state = load_file(str(model_path))
    _finite_weights(model_path, state)
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
    extra = _confined(d, d / EXTRA_FILE, EXTRA_FILE)
    tensors = load_file(str(extra)) if extra.is_file() else {}
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
        if read_checkpoint_meta(p).get("config", {}).get("action_offset", 0):
            raise VlaflowError(
                f"{p}: an imported LeRobot policy (action_offset > 0: its chunk starts before the current "
                "step); composing it with GPC is not supported yet"
            )
        out.append(load_checkpoint(p, device=device))
    return out
