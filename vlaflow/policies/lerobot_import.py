"""LeRobot policies in: a policy directory as LeRobot 0.4.x saves it, rebuilt as a vlaflow policy.

Shapes: B batch, To observation steps, H LeRobot's horizon, Ta actions executed, Da action dim.

What LeRobot writes (``policy.save_pretrained`` + ``preprocessor.save_pretrained`` +
``postprocessor.save_pretrained``)::

    DIR/config.json                 {"type": "diffusion", input/output_features, normalization_mapping, ...}
    DIR/model.safetensors           diffusion.unet.* (and diffusion.rgb_encoder.* with cameras)
    DIR/policy_preprocessor.json    steps; the "normalizer_processor" step names its state_file
    DIR/policy_preprocessor_step_<i>_normalizer_processor.safetensors      "<feature>.<stat>" tensors
    DIR/policy_postprocessor.json   the "unnormalizer_processor" step (action statistics)
    DIR/policy_postprocessor_step_<i>_unnormalizer_processor.safetensors

LeRobot before 0.4 kept the statistics inside ``model.safetensors`` (``normalize_inputs.buffer_<feature>.
<stat>``, ``unnormalize_outputs.buffer_action.<stat>``); those are read when the processor files are absent.
Only JSON and safetensors are read (nothing is unpickled), and no file named by a JSON is followed
outside ``DIR``.

What maps to what (the diffusion policy):

* the U-Net: LeRobot's ``DiffusionConditionalUnet1d`` and vlaflow's :class:`ConditionalUnet1D` are the
  same network (benchmarks/vs_lerobot.py: both 4,559,554 parameters for PushT); only the names differ
  (:func:`unet_key`);
* cameras: LeRobot's ``DiffusionRgbEncoder`` (torchvision ResNet-18, BatchNorm replaced by GroupNorm of 16
  channels per group, spatial-softmax keypoints, Linear + ReLU; shared across cameras unless
  ``use_separate_rgb_encoder_per_camera``) is vlaflow's :class:`ImageEncoder` with ``image_feature_relu``
  (:func:`rgb_key` maps torchvision's names); LeRobot's image normalisation (MEAN_STD / MIN_MAX of x in
  [0, 1], in its preprocessor) becomes the encoder's per-camera pixel mean / std buffers
  (``image_standardize``, :func:`pixel_stats`). Our images are uint8 (h, w, 3); x = image / 255;
* the condition: LeRobot flattens ``[state, cameras, env_state]`` per observation step over To; vlaflow's
  encoder gives ``[state, env_state, cameras]`` per step, so the FiLM projections' input columns are
  permuted (:func:`cond_permutation`);
* the scheduler: DDPM / DDIM (diffusers, ``squaredcos_cap_v2``, epsilon, ``clip_sample``) -> vlaflow's
  VP squared-cosine path with sampler ``ddpm`` / ``ddim`` (eta 0) and LeRobot's ``num_inference_steps``
  (None: all ``num_train_timesteps``);
* the timing: LeRobot's chunk of H actions starts at the *oldest* observation step and it executes rows
  To-1 .. To-1+Ta-1; vlaflow's chunk starts at the current step, so the imported config has
  ``action_offset = To - 1`` and the policy drops those rows (``vlaflow`` chunk = LeRobot's
  ``predict_action_chunk`` extended to H - To + 1 rows);
* normalisation: MIN_MAX -> ``minmax``, MEAN_STD -> ``meanstd``, QUANTILES -> ``quantile``, IDENTITY ->
  ``identity`` (LeRobot adds eps = 1e-8 to the denominators; the difference is far below float tolerance).

Not supported (a clear error): other policy types, ``use_film_scale_modulation=False``,
``prediction_type="sample"``, other beta schedules, QUANTILE10 normalisation, BatchNorm / other
backbones, ``resize_shape``, centre crops whose offsets torchvision rounds differently.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vlaflow.keys as K
from vlaflow.errors import VlaflowError

SUPPORTED_TYPES = ("diffusion",)
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
NORMALIZER_STEP, UNNORMALIZER_STEP = "normalizer_processor", "unnormalizer_processor"
LR_STATE, LR_ENV, LR_ACTION = "observation.state", "observation.environment_state", "action"
NORM_MODES = {"MIN_MAX": "minmax", "MEAN_STD": "meanstd", "QUANTILES": "quantile", "IDENTITY": "identity"}
MODE_STATS = {"minmax": ("min", "max"), "meanstd": ("mean", "std"), "quantile": ("q01", "q99")}
UNET_PREFIX = "diffusion.unet."
HEAD_PREFIX = "head."
RGB_PREFIX = "diffusion.rgb_encoder."
CAMERAS_PREFIX = "obs_encoder.cameras."
EPS = 1e-8  # LeRobot's normaliser eps


class LeRobotImportError(VlaflowError):
    """A LeRobot policy directory that cannot be imported; the message names the file and what is wrong."""


def is_lerobot_policy_dir(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` is a LeRobot policy config (a ``type``, no vlaflow ``format``)."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "type" in meta and "format" not in meta


def _inside(d: Path, name: str, what: str) -> Path:
    """``d/name`` for a file named by a JSON file, refused when it leads outside ``d``."""
    p = d / name
    root, real = d.resolve(), p.resolve()
    if root not in real.parents:
        raise LeRobotImportError(f"{d}: {what} {name!r} leads outside the policy directory; refused")
    if p.suffix != ".safetensors":
        raise LeRobotImportError(f"{d}: {what} {name!r} is not a .safetensors file; refused (no pickles)")
    return p


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LeRobotImportError(f"{path.parent}: missing {path.name} ({what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LeRobotImportError(f"{path}: not a readable safetensors file ({what}): {e}") from None


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise LeRobotImportError(f"{path.parent}: missing {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LeRobotImportError(f"{path}: not valid JSON ({what}): {e}") from None


def _processor_stats(d: Path, file: str, step_name: str) -> dict[str, dict[str, np.ndarray]] | None:
    """``{feature: {stat: array}}`` of the (un)normalizer step of a saved processor pipeline, or None
    when the pipeline file is absent."""
    path = d / file
    if not path.is_file():
        return None
    pipe = _read_json(path, "LeRobot processor pipeline")
    steps = pipe.get("steps", []) if isinstance(pipe, dict) else []
    step = next((s for s in steps if isinstance(s, dict) and s.get("registry_name") == step_name), None)
    if step is None:
        names = [s.get("registry_name") for s in steps if isinstance(s, dict)]
        raise LeRobotImportError(f"{path}: no {step_name!r} step (steps: {names})")
    if "state_file" not in step:
        raise LeRobotImportError(f"{path}: the {step_name!r} step names no state_file (statistics)")
    flat = _load_safetensors(_inside(d, step["state_file"], f"{step_name} state_file"), "statistics")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
        feature, _, stat = key.rpartition(".")
        out.setdefault(feature, {})[stat] = v.float().numpy()
    return out


def _legacy_stats(state: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Statistics kept inside model.safetensors by LeRobot < 0.4 (``normalize_inputs.buffer_<f>.<stat>``);
    feature names come back with '.' (LeRobot replaced them by '_')."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in state.items():
        m = re.match(r"^(?:normalize_inputs|normalize_targets|unnormalize_outputs)\.buffer_(.+)\.(\w+)$", key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = v.float().numpy()
    return out


def read_stats(d: Path, state: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """LeRobot's statistics by feature name and where they came from (processor files, or the legacy
    buffers in model.safetensors); the action's come from the post-processor when it has them."""
    pre = _processor_stats(d, PREPROCESSOR_FILE, NORMALIZER_STEP)
    post = _processor_stats(d, POSTPROCESSOR_FILE, UNNORMALIZER_STEP)
    if pre is None and post is None:
        legacy = _legacy_stats(state)
        if not legacy:
            raise LeRobotImportError(
                f"{d}: missing {PREPROCESSOR_FILE} and {POSTPROCESSOR_FILE} (LeRobot >= 0.4 saves the "
                f"normalisation statistics there) and {MODEL_FILE} has no normalize_* buffers (LeRobot < 0.4)"
            )
        return {k.replace("observation_", "observation.", 1): v for k, v in legacy.items()}, "legacy"
    if pre is None:
        raise LeRobotImportError(f"{d}: missing {PREPROCESSOR_FILE} (input normalisation statistics)")
    stats = dict(pre)
    if post is not None and LR_ACTION in post:
        stats[LR_ACTION] = post[LR_ACTION]
    return stats, "processors"


def _feature(cfg: dict, group: str, name: str) -> tuple[str, tuple[int, ...]] | None:
    f = cfg.get(group, {}).get(name)
    if f is None:
        return None
    return str(f.get("type", "")), tuple(int(s) for s in f.get("shape", ()))


def _refuse(cond: bool, path: Path, msg: str) -> None:
    if cond:
        raise LeRobotImportError(f"{path}: {msg}")


def _image_encoder_config(lr: dict, images: list[str], path: Path):
    """Our encoder config equal to LeRobot's DiffusionRgbEncoder (torchvision ResNet-18 with GroupNorm of
    16 channels per group, spatial softmax, Linear + ReLU; shared across cameras unless separate)."""
    from vlaflow.policies.base_config import EncoderConfig

    _refuse(lr.get("vision_backbone", "resnet18") != "resnet18", path, "vision_backbone: resnet18 only")
    _refuse(not lr.get("use_group_norm", True), path, "use_group_norm=false (BatchNorm) is not supported")
    _refuse(
        lr.get("resize_shape") is not None, path, "resize_shape is not supported (images are not resized)"
    )
    shapes = [tuple(int(x) for x in lr["input_features"][n]["shape"]) for n in images]
    _refuse(any(len(sh) != 3 or sh[0] != 3 for sh in shapes), path, f"camera shapes {shapes}: (3, H, W) only")
    crop = lr.get("crop_shape")
    if crop is not None:
        crop = (int(crop[0]), int(crop[1]))
        _, h, w = shapes[0]
        # torchvision's CenterCrop rounds (h - ch) / 2 half to even, ours floors: the same unless 3 mod 4
        _refuse(
            (h - crop[0]) % 4 == 3 or (w - crop[1]) % 4 == 3,
            path,
            f"crop_shape {crop} of a {h}x{w} image: torchvision's centre crop and ours differ by a pixel",
        )
    kp = int(lr.get("spatial_softmax_num_keypoints", 32))
    mode = str((lr.get("normalization_mapping") or {}).get("VISUAL", "IDENTITY"))
    _refuse(
        mode not in ("MEAN_STD", "MIN_MAX", "IDENTITY"),
        path,
        f"VISUAL normalisation {mode!r} is not supported",
    )
    return EncoderConfig(
        state_encoder="concat",
        image_backbone="resnet18",
        image_base_width=64,
        norm_group_size=16,
        crop_shape=crop,
        num_keypoints=kp,
        image_feature_dim=2 * kp,
        share_camera_encoder=not lr.get("use_separate_rgb_encoder_per_camera", False),
        image_feature_relu=True,
        image_standardize=mode != "IDENTITY",
    )


def pixel_stats(lr: dict, stats: dict, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per camera ``(mean, std)`` (3,) with ``(x - mean) / std`` equal to LeRobot's image normalisation of
    x in [0, 1] (MEAN_STD: std + eps; MIN_MAX: [min, max] -> [-1, 1] as centre and half-range)."""
    mode = str((lr.get("normalization_mapping") or {}).get("VISUAL", "IDENTITY"))
    out = {}
    for name, f in (lr.get("input_features") or {}).items():
        if str(f.get("type")) != "VISUAL" or mode == "IDENTITY":
            continue
        st = stats.get(name, {})
        need = ("mean", "std") if mode == "MEAN_STD" else ("min", "max")
        if any(n not in st for n in need):
            raise LeRobotImportError(
                f"{path.parent}: camera {name!r} is normalised {mode} but its statistics have {sorted(st)}"
            )
        a, b = (np.asarray(st[n], np.float64).reshape(-1) for n in need)
        if a.shape != (3,) or b.shape != (3,):
            raise LeRobotImportError(f"{path.parent}: camera {name!r} statistics are not per channel (3,)")
        if mode == "MEAN_STD":
            mean, std = a, b + EPS
        else:
            span = np.where(b - a == 0, EPS, b - a)
            mean, std = a + span / 2, span / 2
        out[K.from_lerobot(name)] = (mean.astype(np.float32), std.astype(np.float32))
    return out


def diffusion_config_from_lerobot(lr: dict, stats: dict, *, fps: float, path: Path):
    """The :class:`~vlaflow.policies.diffusion.config.DiffusionConfig` equal to LeRobot's diffusion config."""
    from vlaflow.policies.base_config import EncoderConfig, NetConfig, UNetConfig
    from vlaflow.policies.diffusion.config import DiffusionConfig

    inputs = lr.get("input_features", {}) or {}
    images = [n for n, f in inputs.items() if str(f.get("type")) == "VISUAL"]
    encoder = _image_encoder_config(lr, images, path) if images else EncoderConfig(state_encoder="concat")
    state = _feature(lr, "input_features", LR_STATE)
    _refuse(state is None, path, f"input_features has no {LR_STATE!r} (LeRobot's diffusion policy needs it)")
    env = _feature(lr, "input_features", LR_ENV)
    action = _feature(lr, "output_features", LR_ACTION)
    _refuse(action is None, path, f"output_features has no {LR_ACTION!r}")
    ignored = sorted(set(inputs) - {LR_STATE, LR_ENV, *images})
    _refuse(bool(ignored), path, f"input features {ignored} are not read by LeRobot's diffusion policy")
    for key, want in (
        ("prediction_type", "epsilon"),
        ("beta_schedule", "squaredcos_cap_v2"),
        ("use_film_scale_modulation", True),
    ):
        _refuse(lr.get(key, want) != want, path, f"{key}={lr.get(key)!r} is not supported (only {want!r})")
    scheduler = str(lr.get("noise_scheduler_type", "DDPM"))
    _refuse(scheduler not in ("DDPM", "DDIM"), path, f"noise_scheduler_type {scheduler!r}: DDPM or DDIM only")
    n_train = int(lr.get("num_train_timesteps", 100))
    n_infer = lr.get("num_inference_steps")
    n_infer = n_train if n_infer is None else int(n_infer)
    to, horizon = int(lr.get("n_obs_steps", 2)), int(lr.get("horizon", 16))

    obs_shapes = {K.from_lerobot(LR_STATE): state[1]}
    if env is not None:
        obs_shapes[K.from_lerobot(LR_ENV)] = env[1]
    for name in images:  # LeRobot's (C, H, W) -> our uint8 (H, W, C)
        c, h, w = (int(x) for x in inputs[name]["shape"])
        obs_shapes[K.from_lerobot(name)] = (h, w, c)
    mapping = lr.get("normalization_mapping", {}) or {}
    normalization = {}
    for lr_key, feature in [(LR_STATE, state), (LR_ENV, env), (LR_ACTION, action)]:
        if feature is None:  # no environment state: a camera policy
            continue
        ftype = feature[0]
        lr_mode = str(mapping.get(ftype, "IDENTITY"))
        _refuse(
            lr_mode not in NORM_MODES,
            path,
            f"normalization_mapping[{ftype!r}] = {lr_mode!r} is not supported ({sorted(NORM_MODES)})",
        )
        mode = NORM_MODES[lr_mode]
        for s in MODE_STATS.get(mode, ()):
            if s not in stats.get(lr_key, {}):
                raise LeRobotImportError(
                    f"{path.parent}: {lr_key!r} is normalised {lr_mode} but its statistics lack {s!r} "
                    f"(found {sorted(stats.get(lr_key, {}))} for it; "
                    f"features with statistics: {sorted(stats)})"
                )
        normalization[K.from_lerobot(lr_key)] = mode
    down = tuple(int(x) for x in lr.get("down_dims", (512, 1024, 2048)))
    try:
        return DiffusionConfig(
            n_obs_steps=to,
            horizon=horizon,
            n_action_steps=int(lr.get("n_action_steps", 8)),
            obs_shapes=obs_shapes,
            action_dim=action[1][0],
            fps=float(fps),
            normalization=normalization,
            encoder=encoder,
            net=NetConfig(
                kind="unet",
                unet=UNetConfig(
                    down_dims=down,
                    kernel_size=int(lr.get("kernel_size", 5)),
                    n_groups=int(lr.get("n_groups", 8)),
                    step_embed_dim=int(lr.get("diffusion_step_embed_dim", 128)),
                ),
            ),
            sampler=scheduler.lower(),
            num_inference_steps=n_infer,
            num_train_steps=n_train,
            ddim_eta=0.0,
            clip_sample=bool(lr.get("clip_sample", True)),
            clip_sample_range=float(lr.get("clip_sample_range", 1.0)),
            mask_pad_loss=bool(lr.get("do_mask_loss_for_padding", False)),
            action_offset=to - 1,
        )
    except VlaflowError as e:
        raise LeRobotImportError(f"{path}: the LeRobot config does not map onto vlaflow's: {e}") from None


def vlaflow_stats(stats: dict, cfg) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot's statistics under vlaflow keys, only the keys and stats the config normalises."""
    out = {}
    for key, mode in cfg.norm_modes().items():
        lr_key = K.to_lerobot(key)
        out[key] = {s: np.asarray(stats[lr_key][s], np.float32).reshape(-1) for s in MODE_STATS[mode]}
    return out


def unet_key(lr_key: str) -> str:
    """A LeRobot U-Net parameter name (``diffusion.unet.`` stripped) -> vlaflow's ConditionalUnet1D name."""
    k = lr_key
    for a, b in (
        ("diffusion_step_encoder.", "step_encoder."),
        ("down_modules.", "down."),
        ("mid_modules.", "mid."),
        ("up_modules.", "up."),
        ("final_conv.", "final."),
    ):
        if k.startswith(a):
            k = b + k[len(a) :]
            break
    return (
        k.replace(".conv1.block.", ".blocks.0.block.")
        .replace(".conv2.block.", ".blocks.1.block.")
        .replace(".residual_conv.", ".residual.")
    )


def rgb_key(lr_key: str) -> str | None:
    """A LeRobot DiffusionRgbEncoder name (prefix stripped) -> vlaflow's ImageEncoder name; None for
    ``pool.pos_grid`` (a constant buffer we compute). ``backbone`` is torchvision's ResNet-18 children:
    0 conv1, 1 norm, (2 relu, 3 maxpool), 4..7 layer1..layer4 of two BasicBlocks each."""
    if lr_key == "pool.pos_grid":
        return None
    m = re.match(r"^backbone\.(\d+)\.(.*)$", lr_key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i in (0, 1):
            return f"trunk.stem.{i}.{rest}"
        block, _, rest = rest.partition(".")
        rest = rest.replace("bn1.", "norm1.").replace("bn2.", "norm2.").replace("downsample.", "down.")
        return f"trunk.layers.{2 * (i - 4) + int(block)}.{rest}"
    if lr_key.startswith("pool.nets."):
        return "pool.proj." + lr_key[len("pool.nets.") :]
    return lr_key  # out.weight / out.bias


def vlaflow_key(lr_key: str, cameras: list[str], share: bool) -> str | None:
    """Our name for a LeRobot weight (``cameras``: our camera names in LeRobot's image_features order);
    the LeRobot name unchanged when it has no counterpart (reported), None for a buffer we rebuild."""
    if lr_key.startswith(UNET_PREFIX):
        return HEAD_PREFIX + unet_key(lr_key[len(UNET_PREFIX) :])
    if lr_key.startswith(RGB_PREFIX):
        rest = lr_key[len(RGB_PREFIX) :]
        cam = "shared"
        if not share:
            idx, _, rest = rest.partition(".")
            if not idx.isdigit() or int(idx) >= len(cameras):
                return lr_key
            cam = cameras[int(idx)]
        sub = rgb_key(rest)
        return None if sub is None else f"{CAMERAS_PREFIX}{cam}.{sub}"
    return lr_key


def cond_permutation(cfg, lr_images: list[str]) -> Tensor | None:
    """Column order turning LeRobot's FiLM input ``[step emb ; per step (state, cameras, env)]`` into ours
    ``[step emb ; per step (state, env, cameras)]`` (None when they already agree)."""
    shapes = cfg.obs_shapes
    ds = math.prod(shapes[K.OBS_STATE])
    env_key = K.from_lerobot(LR_ENV)
    de = math.prod(shapes[env_key]) if env_key in shapes else 0
    ni = len(lr_images) * cfg.encoder.image_feature_dim
    if de == 0 or ni == 0:
        return None
    per_step = list(range(ds)) + [ds + ni + j for j in range(de)] + [ds + i for i in range(ni)]
    f, emb = ds + de + ni, cfg.net.unet.step_embed_dim
    cols = list(range(emb)) + [emb + s * f + p for s in range(cfg.n_obs_steps) for p in per_step]
    return torch.tensor(cols)


def convert_state_dict(
    lr_state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    path: Path,
    *,
    cameras: list[str] = (),
    share: bool = True,
    permutation: Tensor | None = None,
) -> dict:
    """LeRobot's weights under vlaflow's names; a key or shape mismatch names the first few on both sides.
    Our per-camera pixel statistics buffers are not LeRobot weights (filled from its processor)."""
    lr_net = {k: v for k, v in lr_state.items() if not k.startswith(("normalize_", "unnormalize_"))}
    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for k, v in lr_net.items():
        vk = vlaflow_key(k, list(cameras), share)
        if vk is not None:
            mapped[vk], source[vk] = v, k
    wanted = {k for k in target if not k.startswith("obs_encoder.pixel_")}
    missing = sorted(wanted - set(mapped))
    extra = sorted(set(mapped) - wanted)
    if missing or extra:
        raise LeRobotImportError(
            f"{path}: the LeRobot weights do not match the network its config describes: "
            f"LeRobot keys with no vlaflow counterpart {[source[k] for k in extra][:5]}; "
            f"vlaflow keys with no LeRobot source {missing[:5]} "
            f"({len(lr_net)} LeRobot tensors, {len(wanted)} vlaflow tensors)"
        )
    bad = [
        (source[k], tuple(mapped[k].shape), k, tuple(target[k].shape))
        for k in sorted(wanted)
        if mapped[k].shape != target[k].shape
    ]
    if bad:
        rows = "; ".join(f"LeRobot {a} {sa} vs vlaflow {b} {sb}" for a, sa, b, sb in bad[:4])
        raise LeRobotImportError(f"{path}: {len(bad)} tensor shape mismatch(es): {rows}")
    for k, v in mapped.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise LeRobotImportError(f"{path}: weight {source[k]} holds NaN/inf; refused")
        if permutation is not None and k.endswith("cond_encoder.1.weight"):
            mapped[k] = v[:, permutation]
    return {k: v.float() for k, v in mapped.items()}


def import_lerobot_policy(directory: str | os.PathLike, *, fps: float | None = None):
    """Build the vlaflow policy equal to the LeRobot policy saved in ``directory`` (in memory, eval mode).

    ``fps``: the control rate (LeRobot's policy config does not record it); required.
    Returns ``(policy, provenance)``; ``provenance`` is JSON (source, type, files, LeRobot config).
    """
    from vlaflow.policies.diffusion.model import DiffusionPolicy

    d = Path(directory)
    if not d.is_dir():
        raise LeRobotImportError(
            f"{d}: not a directory (a LeRobot policy directory has {CONFIG_FILE} and {MODEL_FILE})"
        )
    cfg_path = d / CONFIG_FILE
    lr = _read_json(cfg_path, "LeRobot policy config")
    if not isinstance(lr, dict) or "type" not in lr:
        if isinstance(lr, dict) and "format" in lr:
            raise LeRobotImportError(
                f"{cfg_path}: this is a vlaflow checkpoint ({lr['format']}), not a LeRobot policy"
            )
        raise LeRobotImportError(f"{cfg_path}: no policy 'type'; not a LeRobot policy config")
    kind = str(lr["type"])
    if kind not in SUPPORTED_TYPES:
        raise LeRobotImportError(
            f"{cfg_path}: LeRobot policy type {kind!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if fps is None:
        raise LeRobotImportError(
            f"{d}: LeRobot's policy config does not record the control rate; give fps (--fps: the rate of "
            "the dataset it was trained on, e.g. 10 for PushT, 30 for SO-101, 50 for ALOHA)"
        )
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise LeRobotImportError(f"fps must be a positive number, got {fps!r}")
    state = _load_safetensors(d / MODEL_FILE, "LeRobot policy weights")
    stats, stats_source = read_stats(d, state)
    cfg = diffusion_config_from_lerobot(lr, stats, fps=fps, path=cfg_path)
    vstats = vlaflow_stats(stats, cfg)
    for key, st in vstats.items():
        for s, v in st.items():
            want = (cfg.action_dim,) if key == K.ACTION else tuple(cfg.obs_shapes[key])
            if v.shape != (math.prod(want),) or not np.all(np.isfinite(v)):
                raise LeRobotImportError(
                    f"{d}: statistic {K.to_lerobot(key)}.{s} has shape {v.shape} (want {want}) or is not "
                    "finite; refused"
                )
            st[s] = v.reshape(want)
    policy = DiffusionPolicy(cfg, vstats)
    lr_images = [n for n, f in lr["input_features"].items() if str(f.get("type")) == "VISUAL"]
    cameras = [K.camera_of(K.from_lerobot(n)).replace(".", "_") for n in lr_images]
    weights = convert_state_dict(
        state,
        policy.state_dict(),
        d / MODEL_FILE,
        cameras=cameras,
        share=cfg.encoder.share_camera_encoder,
        permutation=cond_permutation(cfg, lr_images),
    )
    for key, (mean, std) in pixel_stats(lr, stats, cfg_path).items():
        cam = K.camera_of(key).replace(".", "_")
        weights[f"obs_encoder.pixel_mean_{cam}"] = torch.from_numpy(mean)
        weights[f"obs_encoder.pixel_std_{cam}"] = torch.from_numpy(std)
    policy.load_state_dict(weights, strict=True)
    provenance = {
        "imported_from": str(d.resolve()),
        "lerobot_type": kind,
        "statistics_from": stats_source,
        "files": sorted(p.name for p in d.iterdir() if p.is_file()),
        "lerobot_config": lr,
    }
    return policy.eval(), provenance
