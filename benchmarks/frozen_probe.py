"""Linear probe of frozen pretrained trunks on PushT: can the T block's pose be read from the features?

Issue 18: image PushT through a frozen EfficientNet-Lite0 + feature cache scored 0.687 (target 0.90), and a
ridge probe of its 96 px / stride-16 maps found the T's keypoints only to 13.5 px. This sweeps trunk
(``PRETRAINED``), input size (the 96 px frame upsampled by the encoder's own resize path,
``ImageEncoder.trunk_features``: bilinear, antialiased) and output stride 8 / 16 / 32, and fits a
closed-form ridge regression from the features to the 9 keypoints (the store's ``obs.keypoint``, raw
``data/keypoint``: pixels of the 512 px PushT field).

Features of a trunk map (N, C, h, w), two readouts:
- ``ssm``: the policy encoder's own pooling, :class:`SpatialSoftmax` (expected x, y per map in [-1, 1]),
  with its 1x1 projection set to the identity (one keypoint per channel, 2C numbers; the policy learns
  the projection to 32 keypoints instead -- a closed-form stand-in for it);
- ``pool``: adaptive average pooling to ``--pool`` x ``--pool`` (at most the map size), flattened (C p^2).

Data: the shared PushT demos (``../shared/data/pusht_cchi_v7``, read in place), episodes split into test
and train episodes (seeded), ``--train`` / ``--test`` frames drawn from each; the ridge penalty is chosen
on validation episodes carved out of the train episodes, then refit on all train frames and scored once
on the test episodes. Error: mean over test frames and the 9 keypoints of the Euclidean distance, px.

The stride-8 and stride-16 maps are taken from inside the stride-32 network (the shorter trunks are its
prefixes -- checked per setting against the truncated trunk on a timing batch), so each frame runs once
per trunk and size; the feature time per frame is measured on the truncated trunk of each stride.

    python benchmarks/frozen_probe.py [--train 3000 --test 1000] [--sizes 96,160,192,224] [--strides 8,16,32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.policies.nets.encoders import ImageEncoder, SpatialSoftmax  # noqa: E402
from vlaflow.policies.nets.pretrained import PRETRAINED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PUSHT_ZARR = REPO.parent / "shared" / "data" / "pusht_cchi_v7" / "pusht_cchi_v7_replay.zarr"
# the unit whose output is the map at each output stride (the truncated trunk's last unit)
CUTS = {
    "efficientnet_lite0": {8: ("_blocks", 4), 16: ("_blocks", 10)},
    "mobilenet_v2": {8: ("features", 6), 16: ("features", 13)},
}
LAMBDAS = np.logspace(-4, 5, 19)


def split_episodes(ends: np.ndarray, test_frac: float, val_frac: float, seed: int) -> dict[str, np.ndarray]:
    n = len(ends)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_frac)
    test, train = np.sort(perm[:n_test]), perm[n_test:]
    n_val = round(len(train) * val_frac)
    return {"test": test, "val": np.sort(train[:n_val]), "fit": np.sort(train[n_val:])}


def episode_frames(ends: np.ndarray, eps: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], ends[:-1]])
    return np.concatenate([np.arange(starts[e], ends[e]) for e in eps])


def load_sample(path: Path, n_train: int, n_test: int, seed: int) -> dict:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    ends = np.asarray(g["meta"]["episode_ends"][:], dtype=np.int64)
    split = split_episodes(ends, 0.2, 0.2, seed)
    rng = np.random.default_rng(seed + 1)
    pools = {k: episode_frames(ends, v) for k, v in split.items()}
    # train frames: fit and val episodes in proportion to their frame counts
    n_fit = round(n_train * len(pools["fit"]) / (len(pools["fit"]) + len(pools["val"])))
    want = {"fit": n_fit, "val": n_train - n_fit, "test": n_test}
    idx = {k: np.sort(rng.choice(pools[k], min(want[k], len(pools[k])), replace=False)) for k in want}
    allidx = np.concatenate([idx["fit"], idx["val"], idx["test"]])
    order = np.argsort(allidx)
    img_arr, kp_arr = g["data"]["img"], g["data"]["keypoint"]
    imgs = np.empty((len(allidx), *img_arr.shape[1:]), np.uint8)
    chunk = img_arr.chunks[0]
    sorted_idx = allidx[order]
    for c0 in range(0, img_arr.shape[0], chunk):
        sel = (sorted_idx >= c0) & (sorted_idx < c0 + chunk)
        if sel.any():
            block = np.asarray(img_arr[c0 : c0 + chunk])
            # as `vlaflow ingest` stores PushT's float 0..255 frames
            imgs[order[sel]] = np.rint(np.clip(block[sorted_idx[sel] - c0], 0, 255)).astype(np.uint8)
    kps = np.asarray(kp_arr[:], dtype=np.float64)[allidx].reshape(len(allidx), -1)
    parts = np.repeat(["fit", "val", "test"], [len(idx["fit"]), len(idx["val"]), len(idx["test"])])
    return {
        "imgs": torch.from_numpy(imgs),
        "kps": kps,
        "parts": parts,
        "episodes": {k: [int(e) for e in v] for k, v in split.items()},
        "n_frames": {k: int(len(v)) for k, v in idx.items()},
    }


def readouts(feat: torch.Tensor, pool: int) -> dict[str, torch.Tensor]:
    n, c, h, w = feat.shape
    ssm = SpatialSoftmax(c, c)
    with torch.no_grad():
        ssm.proj.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        ssm.proj.bias.zero_()
        p = (min(pool, h), min(pool, w))
        return {"ssm": ssm(feat), "pool": F.adaptive_avg_pool2d(feat, p).flatten(1)}


def kp_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean Euclidean keypoint error, px: (N, 18) flattened (9, 2) pairs."""
    d = (pred - true).reshape(len(true), -1, 2)
    return float(np.sqrt((d**2).sum(-1)).mean())


def coord_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Per-coordinate errors, px: mean |dx|, |dy| and their root mean square (other units of the same fit)."""
    d = pred - true
    return {
        "test_abs_px": round(float(np.abs(d).mean()), 2),
        "test_rms_px": round(float(np.sqrt((d**2).mean())), 2),
    }


class Ridge:
    """Closed-form ridge for every lambda at once: eigendecomposition of X^T X (d <= n) or X X^T (d > n)."""

    def __init__(self, x: torch.Tensor, y: np.ndarray):
        # Gram products in float32 (standardized features), the eigendecomposition in float64
        self.dual = x.shape[1] > x.shape[0]
        x = x.float()
        y64 = torch.from_numpy(y)
        if self.dual:
            s, u = torch.linalg.eigh((x @ x.T).double())
            self.x, self.s, self.uty, self.u = x, s.clamp_min(0), u.T @ y64, u
        else:
            s, v = torch.linalg.eigh((x.T @ x).double())
            self.s, self.v, self.vtxty = s.clamp_min(0), v, v.T @ (x.double().T @ y64)

    def predict(self, xq: torch.Tensor, lam: float) -> np.ndarray:
        if self.dual:
            alpha = self.u @ (self.uty / (self.s[:, None] + lam))
            return ((xq.float() @ self.x.T).double() @ alpha).numpy()
        return (xq.double() @ (self.v @ (self.vtxty / (self.s[:, None] + lam)))).numpy()


def probe(x: torch.Tensor, kps: np.ndarray, parts: np.ndarray) -> dict:
    fit, val, test = (parts == "fit"), (parts == "val"), (parts == "test")
    train = fit | val

    def standardize(mask):
        mu, sd = x[mask].mean(0), x[mask].std(0).clamp_min(1e-6)
        ymu = kps[mask].mean(0)
        return (lambda z: (z - mu) / sd), ymu

    z, ymu = standardize(fit)
    r = Ridge(z(x[fit]), kps[fit] - ymu)
    scale = float(fit.sum())  # lambda per sample: the grid means the same for any n
    val_err = [kp_error(r.predict(z(x[val]), lam * scale) + ymu, kps[val]) for lam in LAMBDAS]
    best = int(np.argmin(val_err))
    z, ymu = standardize(train)
    r = Ridge(z(x[train]), kps[train] - ymu)
    pred = r.predict(z(x[test]), LAMBDAS[best] * float(train.sum())) + ymu
    return {
        "dim": int(x.shape[1]),
        "lambda": float(LAMBDAS[best]),
        "val_px": round(val_err[best], 2),
        "test_px": round(kp_error(pred, kps[test]), 2),
        **coord_errors(pred, kps[test]),
        "train_px": round(
            kp_error(r.predict(z(x[train]), LAMBDAS[best] * float(train.sum())) + ymu, kps[train]), 2
        ),
    }


def time_trunk(
    name: str, stride: int, size: int, imgs: torch.Tensor, reps: int
) -> tuple[float, torch.Tensor]:
    enc = ImageEncoder((96, 96, 3), name, crop_shape=None, feature_stride=stride, resize=(size, size)).eval()
    with torch.no_grad():
        out = enc.trunk_features(imgs)  # warm-up, and the reference map
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            enc.trunk_features(imgs)
            best = min(best, time.perf_counter() - t0)
    return best / len(imgs) * 1e3, out


def capture(module: torch.nn.Module, store: dict, key) -> torch.utils.hooks.RemovableHandle:
    """Keep ``module``'s output in ``store[key]`` on every forward."""

    def hook(m, inp, out):
        store[key] = out

    return module.register_forward_hook(hook)


def cut_unit(enc: ImageEncoder, name: str, stride: int) -> torch.nn.Module:
    attr, i = CUTS[name][stride]
    return getattr(enc.trunk.net, attr)[i]


def sweep_trunk(name: str, sizes, strides, data: dict, args) -> list[dict]:
    rows = []
    imgs, n = data["imgs"], len(data["imgs"])
    for size in sizes:
        enc = ImageEncoder((96, 96, 3), name, crop_shape=None, feature_stride=32, resize=(size, size)).eval()
        taps: dict = {}
        hooks = [capture(cut_unit(enc, name, s), taps, s) for s in strides if s != 32]
        feats: dict[tuple[int, str], list[torch.Tensor]] = {}
        shapes = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            for b0 in range(0, n, args.batch):
                taps[32] = enc.trunk_features(imgs[b0 : b0 + args.batch])
                for s in strides:
                    shapes[s] = tuple(taps[s].shape[1:])
                    for kind, v in readouts(taps[s], args.pool).items():
                        feats.setdefault((s, kind), []).append(v)
            extract_s = time.perf_counter() - t0
            tb = imgs[: args.time_batch]
            taps.clear()
            taps[32] = enc.trunk_features(tb)  # the timing batch through the full net, maps tapped
        for h in hooks:
            h.remove()
        for s in strides:
            ms, ref = time_trunk(name, s, size, tb, args.time_reps)
            assert torch.allclose(taps[s], ref, atol=1e-5), (
                f"{name} stride {s}: tapped map != truncated trunk"
            )
            for kind in ("ssm", "pool"):
                t1 = time.perf_counter()
                res = probe(torch.cat(feats.pop((s, kind))), data["kps"], data["parts"])
                row = {
                    "trunk": name,
                    "size": size,
                    "stride": s,
                    "map": list(shapes[s]),
                    "readout": kind,
                    **res,
                    "trunk_ms_per_frame": round(ms, 2),
                    "probe_s": round(time.perf_counter() - t1, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"{name} {size}px: features of {n} frames in {extract_s:.1f} s", flush=True)
    return rows


def table(rows: list[dict], baseline: float) -> str:
    """Markdown. test px: mean Euclidean keypoint error on the test episodes; abs px: mean |dx|, |dy|."""
    lines = [
        "| trunk | input | stride | map (C, h, w) | readout | dim | test px | test abs px | val px "
        "| train px | lambda | trunk ms/frame |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trunk']} | {r['size']} | {r['stride']} | {tuple(r['map'])} | {r['readout']} | {r['dim']} "
            f"| {r['test_px']:.2f} | {r['test_abs_px']:.2f} | {r['val_px']:.2f} | {r['train_px']:.2f} "
            f"| {r['lambda']:g} | {r['trunk_ms_per_frame']:.2f} |"
        )
    lines.append(f"\nConstant guess (train mean keypoints): {baseline:.2f} px on the test episodes.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(PUSHT_ZARR), help="Diffusion Policy PushT replay zarr")
    ap.add_argument("--train", type=int, default=3000, help="frames from train episodes (fit + val)")
    ap.add_argument("--test", type=int, default=1000, help="frames from held-out test episodes")
    ap.add_argument("--trunks", default=",".join(PRETRAINED))
    ap.add_argument("--sizes", default="96,160,192,224")
    ap.add_argument("--strides", default="8,16,32")
    ap.add_argument("--pool", type=int, default=6, help="adaptive avg-pool size of the 'pool' readout")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--time-batch", type=int, default=32)
    ap.add_argument("--time-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "frozen_probe"), help="stem of .json/.md"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = run_info()
    t_start = time.perf_counter()
    data = load_sample(Path(args.data), args.train, args.test, args.seed)
    train = data["parts"] != "test"
    base = kp_error(
        np.broadcast_to(data["kps"][train].mean(0), data["kps"][~train].shape), data["kps"][~train]
    )
    load_s = time.perf_counter() - t_start
    const = np.broadcast_to(data["kps"][train].mean(0), data["kps"][~train].shape)
    base_coord = coord_errors(const, data["kps"][~train])
    print(f"loaded {data['n_frames']} frames in {load_s:.1f} s; constant guess {base:.2f} px {base_coord}")
    sizes = [int(s) for s in args.sizes.split(",")]
    strides = [int(s) for s in args.strides.split(",")]
    rows = []
    for name in args.trunks.split(","):
        rows += sweep_trunk(name, sizes, strides, data, args)
    total_min = (time.perf_counter() - t_start) / 60
    out = {
        **meta,
        "what": "ridge probe: frozen trunk features -> PushT T-block keypoints (9 x 2, px, 512 px field)",
        "load_s": round(load_s, 1),
        "data": args.data,
        "threads": args.threads,
        "frames": data["n_frames"],
        "episodes": {k: len(v) for k, v in data["episodes"].items()},
        "test_episodes": data["episodes"]["test"],
        "lambda_grid_per_sample": [float(x) for x in LAMBDAS],
        "pool": args.pool,
        "constant_guess_test_px": round(base, 2),
        "constant_guess_coord": base_coord,
        "total_minutes": round(total_min, 2),
        "rows": rows,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table(rows, base) + "\n")
    print(table(rows, base))
    print(f"wrote {stem}.json / .md in {total_min:.1f} min")


if __name__ == "__main__":
    main()
