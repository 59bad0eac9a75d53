"""Feature cache for frozen pretrained image trunks: computed once per (store, encoder), reused after.

A frozen trunk (``encoder.image_finetune=frozen`` with ``efficientnet_lite0`` / ``mobilenet_v2``) is a pure
function of the pixels, so its feature maps for every frame of a store are computed once and training runs
only the trainable head (spatial softmax + linear) on them -- at about the speed of a low-dim policy.

Shapes: N store rows, K cached crops, (C, h', w') the trunk's map. The cache file holds
``features`` (N, K, C, h', w') float16 (half the bytes; the head computes in float32) in safetensors, with
its key document as JSON metadata. Never a pickle.

The cache key is the sha256 of: the store's fingerprint (schema, episode ends, array layout;
:func:`vlaflow.train.provenance.store_fingerprint`), a blake2b digest of the image array's content, the
image key, and the encoder's identity (backbone, the pinned sha256 of its weight file, output stride,
image / crop / resize sizes, the crop corners) plus a format version. Any change to the data or the encoder
gives another key, so a stale cache is never read: it is rebuilt (and the old file left for the user to
delete, it may belong to another run).

Augmentation, honestly: a cache of features cannot random-crop. With ``encoder.feature_cache_crops = K``
the features of K *fixed* crops per frame are cached (the center crop first, then the four corners, then
an even grid; :func:`vlaflow.policies.nets.encoders.fixed_crop_offsets`) and training draws one of the K
per sample; evaluation always uses the center crop, computed online from the camera image by the same
trunk. K = 1 (the default) means no crop augmentation at all; colour or other pixel-level augmentation is
impossible with the cache (fine-tune the trunk, ``partial`` / ``full``, to have it: then there is no cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from vlaflow.policies.nets.encoders import ImageEncoder, cached_feature_key
from vlaflow.policies.nets.pretrained import cache_dir
from vlaflow.train.provenance import store_fingerprint

FORMAT = "vlaflow.feature_cache"
FORMAT_VERSION = 1
ROWS_PER_READ = 2048


def cacheable_cameras(policy: torch.nn.Module) -> dict[str, ImageEncoder]:
    """Image key -> its encoder, for the policy's cameras whose trunk is frozen and pretrained."""
    enc = getattr(policy, "obs_encoder", None)
    if enc is None:
        return {}
    return {k: enc.camera_encoder(k) for k in enc.image_keys if enc.camera_encoder(k).cacheable}


def encoder_identity(encoder: ImageEncoder) -> dict:
    return {
        "backbone": encoder.backbone,
        "weights_sha256": encoder.trunk.weights_sha256,
        "stride": int(encoder.trunk.stride),
        "image_hw": list(encoder.image_hw),
        "crop_shape": list(encoder.crop_shape) if encoder.crop_shape else None,
        "resize": list(encoder.resize) if encoder.resize else None,
        "crop_offsets": [list(o) for o in encoder.cache_offsets],
        "feature_shape": list(encoder.feature_shape),
    }


def content_digest(store, key: str) -> str:
    """blake2b of the decoded array ``key`` (row blocks of the store, in order)."""
    h = hashlib.blake2b(digest_size=16)
    n = int(store.array(key).shape[0])
    for s in range(0, n, ROWS_PER_READ):
        h.update(np.ascontiguousarray(store._read(key, slice(s, min(n, s + ROWS_PER_READ)))).tobytes())
    return h.hexdigest()


def cache_key(store, image_key: str, encoder: ImageEncoder) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "store_fingerprint": store_fingerprint(store),
        "content": content_digest(store, image_key),
        "image_key": image_key,
        "n_rows": int(store.array(image_key).shape[0]),
        "encoder": encoder_identity(encoder),
    }


def compute_features(store, image_key: str, encoder: ImageEncoder, batch: int = 16, progress: bool = True):
    """(N, K, C, h', w') float16 maps of every row of ``image_key`` under the encoder's fixed crops."""
    n = int(store.array(image_key).shape[0])
    k = len(encoder.cache_offsets)
    out = np.empty((n, k, *encoder.feature_shape), np.float16)
    was = encoder.training
    encoder.eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"feature cache {image_key} ({encoder.backbone})", unit="frame")
    try:
        with torch.no_grad():
            for s in range(0, n, ROWS_PER_READ):
                rows = torch.from_numpy(store._read(image_key, slice(s, min(n, s + ROWS_PER_READ))))
                for b in range(0, rows.shape[0], batch):
                    img = rows[b : b + batch]
                    for i in range(k):
                        f = encoder.trunk_features(encoder.crop_for_cache(img, i))
                        out[s + b : s + b + img.shape[0], i] = f.numpy().astype(np.float16)
                    if bar is not None:
                        bar.update(img.shape[0])
    finally:
        encoder.train(was)
        if bar is not None:
            bar.close()
    return out


def load_or_build(
    store, image_key: str, encoder: ImageEncoder, root: str | os.PathLike | None = None, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """(features (N, K, C, h', w') float16, info) -- read from the cache, or computed and written there.

    ``info``: ``path``, ``built`` (True when computed now), ``seconds``, ``key`` (the key document)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    root = Path(root) if root else cache_dir() / "features"
    key = cache_key(store, image_key, encoder)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = root / f"{image_key.replace('/', '_')}-{encoder.backbone}-{digest}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("key", "null"))
                if meta == key:
                    feats = f.get_tensor("features").numpy()
                    return feats, {
                        "path": str(path),
                        "built": False,
                        "seconds": time.perf_counter() - t0,
                        "key": key,
                    }
        except Exception as e:  # a truncated or foreign file under our name: say so, then rebuild it
            print(f"feature cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
    feats = compute_features(store, image_key, encoder, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(
        {"features": torch.from_numpy(feats)}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)}
    )
    os.replace(tmp, path)  # a kill mid-write leaves no half cache under the real name
    return feats, {"path": str(path), "built": True, "seconds": time.perf_counter() - t0, "key": key}


def attach_feature_cache(
    policy: torch.nn.Module, store, windows, root: str | os.PathLike | None = None, progress: bool = True
) -> list[dict]:
    """Swap each frozen pretrained camera's images in ``windows`` for its cached maps.

    After this, batches carry ``features/<image key>`` (B, To, K, C, h', w') instead of the uint8 images,
    and :class:`~vlaflow.policies.nets.encoders.ObsEncoder` runs only the head on them. Returns one info
    dict per camera (see :func:`load_or_build`); an empty list when no camera is cacheable."""
    infos = []
    for image_key, encoder in cacheable_cameras(policy).items():
        if image_key not in windows.obs_keys:
            continue
        feats, info = load_or_build(store, image_key, encoder, root, progress=progress)
        rows = windows.rows
        part = np.concatenate([feats[s:e] for s, e in rows]) if rows else feats[:0]
        fk = cached_feature_key(image_key)
        windows.data[fk] = part
        windows.obs_keys = [fk if k == image_key else k for k in windows.obs_keys]
        del windows.data[image_key]  # the images are no longer gathered per batch
        infos.append({**info, "image_key": image_key, "shape": list(feats.shape)})
    return infos
