"""Observation encoders: low-dim state, cameras (a trunk + spatial softmax), multi-camera.

Camera trunks: ResNet-18 + GroupNorm from scratch, or EfficientNet-Lite0 / MobileNetV2 with ImageNet
weights (:mod:`vlaflow.policies.nets.pretrained`; frozen, partly or fully fine-tuned). A frozen pretrained
trunk's feature maps can come precomputed in the batch under ``cached_feature_key(image_key)``
(:mod:`vlaflow.train.feature_cache`), so training runs only the spatial-softmax head.

Shapes: B batch, To observation steps, Fs state features, Fi image features per camera.
``ObsEncoder`` maps an obs dict (low-dim keys already normalized; images uint8 (B, To, h, w, 3)) to
per-step feature tokens (B, To, Fs + n_cam * Fi); the language token is added by the policy.

No torchvision: the ResNet-18 is written here (BatchNorm replaced by GroupNorm, as Diffusion Policy
does, because BatchNorm statistics do not survive EMA averaging well). ``timm`` may supply another
backbone (``backbone="timm:<name>"``) when it is installed; weights never download (pretrained=False).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlaflow.keys as K
from vlaflow.policies.nets.pretrained import PRETRAINED, PretrainedTrunk

FEATURE_PREFIX = "features/"  # batch key of cached trunk features: features/<image key>  (B, To, K, C, h, w)


def cached_feature_key(image_key: str) -> str:
    return FEATURE_PREFIX + image_key


def _gn(c: int, group_size: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, c // group_size), c)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, group_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _gn(c_out, group_size)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _gn(c_out, group_size)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _gn(c_out, group_size))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18GN(nn.Module):
    """ResNet-18 trunk (no pooling/fc) with GroupNorm; widths (w, 2w, 4w, 8w); output stride 32."""

    def __init__(self, base_width: int = 64, group_size: int = 16):
        super().__init__()
        w = base_width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 7, 2, 3, bias=False), _gn(w, group_size), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, c_in = [], w
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c, stride, group_size), BasicBlock(c, c, 1, group_size)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Keypoints as softmax-weighted expected image coordinates in [-1, 1] (Levine et al.; robomimic)."""

    def __init__(self, c_in: int, num_keypoints: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, num_keypoints, 1)
        self.num_keypoints = num_keypoints

    def forward(self, feat: Tensor) -> Tensor:  # (N, C, h, w) -> (N, 2K)
        n, _, h, w = feat.shape
        logits = self.proj(feat).flatten(2)  # (N, K, h*w)
        attn = logits.softmax(dim=-1)
        ys = torch.linspace(-1, 1, h, device=feat.device)
        xs = torch.linspace(-1, 1, w, device=feat.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        ex = (attn * gx.reshape(1, 1, -1)).sum(-1)
        ey = (attn * gy.reshape(1, 1, -1)).sum(-1)
        return torch.stack([ex, ey], dim=-1).reshape(n, 2 * self.num_keypoints)


def random_crop(x: Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """Independent random crop per image: (N, h, w, C) -> (N, ch, cw, C) (works on uint8)."""
    n, h, w, _ = x.shape
    ch, cw = size
    oy = torch.randint(0, h - ch + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, w - cw + 1, (n,), generator=generator).to(x.device)
    rows = oy[:, None] + torch.arange(ch, device=x.device)[None]  # (N, ch)
    cols = ox[:, None] + torch.arange(cw, device=x.device)[None]  # (N, cw)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return x[idx, rows[:, :, None], cols[:, None, :]]


def center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    _, h, w, _ = x.shape
    ch, cw = size
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return x[:, y0 : y0 + ch, x0 : x0 + cw]


def fixed_crop_offsets(image_hw: tuple[int, int], crop_hw: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """``n`` deterministic crop corners: the center first, then the four corners, then an even grid."""
    (h, w), (ch, cw) = image_hw, crop_hw
    my, mx = h - ch, w - cw
    cands = [(my // 2, mx // 2), (0, 0), (0, mx), (my, 0), (my, mx)]
    g = max(2, math.ceil(math.sqrt(n)) + 1)
    cands += [(round(my * i / (g - 1)), round(mx * j / (g - 1))) for i in range(g) for j in range(g)]
    out: list[tuple[int, int]] = []
    for c in cands:
        if c not in out:
            out.append(c)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {crop_hw} crops of a {image_hw} image, asked for {n}")
    return out[:n]


def _timm_backbone(name: str) -> tuple[nn.Module, int]:
    try:
        import timm  # optional: only a source of architectures
    except ImportError as e:
        raise ImportError(
            f"image backbone 'timm:{name}' needs the optional package timm (pip install timm)"
        ) from e
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    return model, int(model.num_features)


class ImageEncoder(nn.Module):
    """uint8 (N, h, w, 3) -> (N, Fi): crop (random when training, center in eval), /255, trunk, keypoints."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        backbone: str = "resnet18",
        base_width: int = 64,
        group_size: int = 16,
        crop_shape: tuple[int, int] | None = (84, 84),
        num_keypoints: int = 32,
        feature_dim: int = 64,
        finetune: str = "frozen",
        trainable_stages: int = 2,
        feature_stride: int = 32,
        resize: tuple[int, int] | None = None,
        cache_crops: int = 1,
        feature_relu: bool = False,
    ):
        super().__init__()
        self.feature_relu = bool(feature_relu)
        h, w, c = image_shape
        if c != 3:
            raise ValueError(f"images must be (h, w, 3) uint8, got per-step shape {image_shape}")
        if crop_shape is not None and (crop_shape[0] > h or crop_shape[1] > w):
            raise ValueError(f"crop_shape {tuple(crop_shape)} is larger than the image ({h}, {w})")
        self.crop_shape = tuple(crop_shape) if crop_shape is not None else None
        self.image_hw = (h, w)
        self.resize = tuple(resize) if resize is not None else None
        self.pretrained = backbone in PRETRAINED
        if backbone == "resnet18":
            self.trunk = ResNet18GN(base_width, group_size)
            c_out = self.trunk.out_channels
        elif self.pretrained:
            self.trunk = PretrainedTrunk(backbone, feature_stride, finetune, trainable_stages)
            c_out = self.trunk.out_channels
        elif backbone.startswith("timm:"):
            self.trunk, c_out = _timm_backbone(backbone[len("timm:") :])
        else:
            raise ValueError(
                f"unknown image backbone {backbone!r}; expected 'resnet18', {sorted(PRETRAINED)} "
                "or 'timm:<name>'"
            )
        self.backbone = backbone
        # a frozen pretrained trunk is a pure function of the pixels: its features may be cached
        self.cacheable = self.pretrained and finetune == "frozen"
        if self.crop_shape is None and cache_crops > 1:
            raise ValueError("feature_cache_crops > 1 needs a crop_shape (there is nothing to crop)")
        self.cache_offsets = (
            fixed_crop_offsets((h, w), self.crop_shape, cache_crops)
            if self.crop_shape is not None
            else [(0, 0)]
        )
        in_hw = self.resize or self.crop_shape or (h, w)
        with torch.no_grad():
            feat_hw = tuple(self.trunk(torch.zeros(1, 3, *in_hw)).shape[-2:])
        if feat_hw == (1, 1):
            raise ValueError(
                f"an image input of {in_hw} px (crop_shape or image size) leaves a 1x1 feature map after the "
                f"{backbone} trunk, where spatial-softmax keypoints are constant: use a larger input"
            )
        self.feature_shape = (c_out, *feat_hw)  # (C, h', w') of the trunk's map
        self.pool = SpatialSoftmax(c_out, num_keypoints)
        self.out = nn.Linear(2 * num_keypoints, feature_dim)
        self.feature_dim = feature_dim

    def trunk_features(self, img: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """Already-cropped uint8 (N, ch, cw, 3) -> trunk map (N, C, h', w'); ``mean`` / ``std`` (3,):
        per-channel standardisation of x / 255 (an imported LeRobot encoder's), not for a pretrained trunk."""
        x = img.permute(0, 3, 1, 2).float()  # (N, 3, ch, cw)
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        if self.pretrained:
            return self.trunk(x)  # the trunk applies its own normalisation on 0..255
        x = x / 255.0
        if mean is not None:
            x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        return self.trunk(x)

    def crop_for_cache(self, img: Tensor, i: int) -> Tensor:
        """Fixed crop ``i`` of :attr:`cache_offsets` (0 = the center crop used in evaluation)."""
        if self.crop_shape is None:
            return img
        y0, x0 = self.cache_offsets[i]
        return img[:, y0 : y0 + self.crop_shape[0], x0 : x0 + self.crop_shape[1]]

    def head(self, feat: Tensor) -> Tensor:
        out = self.out(self.pool(feat))
        return F.relu(out) if self.feature_relu else out

    def forward(self, img: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """uint8 (N, h, w, 3) -> (N, Fi); ``mean`` / ``std``: see :meth:`trunk_features`."""
        if self.crop_shape is not None:
            img = random_crop(img, self.crop_shape) if self.training else center_crop(img, self.crop_shape)
        return self.head(self.trunk_features(img, mean, std))

    def forward_cached(self, feats: Tensor) -> Tensor:
        """Cached maps (N, K, C, h', w') of K fixed crops -> (N, Fi): random in training, else crop 0."""
        n, k = feats.shape[:2]
        if self.training and k > 1:
            pick = torch.randint(0, k, (n,)).to(feats.device)
        else:
            pick = torch.zeros(n, dtype=torch.long, device=feats.device)
        return self.head(feats[torch.arange(n, device=feats.device), pick].float())


class StateEncoder(nn.Module):
    """Concatenate flattened low-dim keys (identity, Diffusion Policy's choice) or run them through an MLP."""

    def __init__(
        self, in_dim: int, mode: str = "concat", hidden: tuple[int, ...] = (256,), out_dim: int = 64
    ):
        super().__init__()
        if mode == "concat":
            self.net, self.out_dim = nn.Identity(), in_dim
        elif mode == "mlp":
            layers, d = [], in_dim
            for hdim in hidden:
                layers += [nn.Linear(d, hdim), nn.Mish()]
                d = hdim
            layers.append(nn.Linear(d, out_dim))
            self.net, self.out_dim = nn.Sequential(*layers), out_dim
        else:
            raise ValueError(f"unknown state encoder mode {mode!r}; expected 'concat' or 'mlp'")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ObsEncoder(nn.Module):
    """Obs dict -> per-step tokens (B, To, F). Low-dim keys must arrive normalized; images uint8."""

    def __init__(self, obs_shapes: dict[str, tuple[int, ...]], enc_cfg):
        super().__init__()
        self.lowdim_keys = [k for k in obs_shapes if not K.is_image(k)]
        self.image_keys = [k for k in obs_shapes if K.is_image(k)]
        lowdim = sum(math.prod(obs_shapes[k]) for k in self.lowdim_keys)
        self.state = (
            StateEncoder(
                lowdim, enc_cfg.state_encoder, tuple(enc_cfg.state_hidden_dims), enc_cfg.state_feature_dim
            )
            if self.lowdim_keys
            else None
        )
        self.share = bool(enc_cfg.share_camera_encoder)

        def make(key):
            return ImageEncoder(
                tuple(obs_shapes[key]),
                enc_cfg.image_backbone,
                enc_cfg.image_base_width,
                enc_cfg.norm_group_size,
                enc_cfg.crop_shape,
                enc_cfg.num_keypoints,
                enc_cfg.image_feature_dim,
                enc_cfg.image_finetune,
                enc_cfg.image_trainable_stages,
                enc_cfg.image_feature_stride,
                enc_cfg.image_resize,
                enc_cfg.feature_cache_crops,
                getattr(enc_cfg, "image_feature_relu", False),
            )

        self.cameras = nn.ModuleDict()
        if self.image_keys:
            if self.share:
                shapes = {tuple(obs_shapes[k]) for k in self.image_keys}
                if len(shapes) > 1:
                    raise ValueError(f"share_camera_encoder needs equal image shapes, got {sorted(shapes)}")
                self.cameras["shared"] = make(self.image_keys[0])
            else:
                for k in self.image_keys:
                    self.cameras[self._cam(k)] = make(k)
        self.out_dim = (self.state.out_dim if self.state is not None else 0) + len(self.image_keys) * (
            enc_cfg.image_feature_dim
        )
        self.standardize = bool(getattr(enc_cfg, "image_standardize", False))
        if self.standardize:  # per camera: a shared trunk still sees each camera's own statistics
            for k in self.image_keys:
                self.register_buffer(f"pixel_mean_{self._cam(k)}", torch.zeros(3))
                self.register_buffer(f"pixel_std_{self._cam(k)}", torch.ones(3))

    @staticmethod
    def _cam(key: str) -> str:
        return K.camera_of(key).replace(".", "_")

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        feats = []
        if self.state is not None:
            b, to = obs[self.lowdim_keys[0]].shape[:2]
            flat = torch.cat([obs[k].reshape(b, to, -1).float() for k in self.lowdim_keys], dim=-1)
            feats.append(self.state(flat))
        for k in self.image_keys:
            enc = self.camera_encoder(k)
            fk = cached_feature_key(k)
            if fk in obs:  # precomputed frozen-trunk maps (B, To, K, C, h', w')
                f = obs[fk]
                b, to = f.shape[:2]
                feats.append(enc.forward_cached(f.reshape(b * to, *f.shape[2:])).reshape(b, to, -1))
                continue
            img = obs[k]  # (B, To, h, w, 3) uint8
            b, to = img.shape[:2]
            ms = ()
            if self.standardize:
                ms = (getattr(self, f"pixel_mean_{self._cam(k)}"), getattr(self, f"pixel_std_{self._cam(k)}"))
            feats.append(enc(img.reshape(b * to, *img.shape[2:]), *ms).reshape(b, to, -1))
        return torch.cat(feats, dim=-1)  # (B, To, F)

    def camera_encoder(self, image_key: str) -> ImageEncoder:
        return self.cameras["shared" if self.share else self._cam(image_key)]
