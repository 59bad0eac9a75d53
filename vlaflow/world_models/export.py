"""A world model's per-step denoiser as ONNX plus a JSON manifest, checked against PyTorch before anything
is written (the policies' export contract, :mod:`vlaflow.deploy.export`, for the world model's graph).

Shapes: Tf next observations, Do obs dim, C condition width (batch fixed to 1, as the policies' export).

- ``denoiser.onnx``: ``predict(x_t (1, Tf, Do), t (1,), cond (1, 1, C)) -> x0 (1, Tf, Do)``, the
  EDM-preconditioned clean estimate in normalized target units; path time ``t`` is an input, so one graph
  serves every step of the sampler. No Loop op: the sampler loop runs on the host.
- The condition (normalized window, sin/cos of angle dims, two-hot or continuous actions) and the target's
  unnormalization (delta + last observation, angles wrapped) stay on the host; the manifest records the
  config and normalizer they need.
- ``manifest.json``: graph io, config, normalizer statistics, sampler and its time grid, parity summary.
  ``parity.json``: per denoiser step (along torch's own chain) and per predicted next state, max-abs and
  cosine of ONNX Runtime against PyTorch for random in-range conditions and fixed noise. The next-state
  parity runs the library's own sampler (:func:`vlaflow.policies.samplers.sample_loop`) with the ORT graph
  as its ``predict``: nothing of the sampler is re-implemented.

A parity failure fails the export and leaves no directory (it is written to a temporary sibling first).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from vlaflow.atomic import atomic_directory
from vlaflow.errors import VlaflowError
from vlaflow.policies.onnx_graph import EXPORTERS, export_graph
from vlaflow.policies.samplers import sample_loop
from vlaflow.world_models.model import DiffusionWorldModel

FORMAT, VERSION = "vlaflow.onnx_world_model", 1
MANIFEST, PARITY, DENOISER = "manifest.json", "parity.json", "denoiser.onnx"


class _DenoiserGraph(nn.Module):
    def __init__(self, model: DiffusionWorldModel):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, cond):
        return self.model.predict(x_t, t, cond)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if den == 0 else float(a @ b / den)


def _random_inputs(model: DiffusionWorldModel, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A raw window (1, To, Do) and actions (1, Tf, Da) inside the training data's range."""
    cfg, st = model.config, model.normalizer.stats
    lo, hi = (np.asarray(st[cfg.obs_key][k], np.float64) for k in ("min", "max"))
    alo, ahi = (np.asarray(st[cfg.action_key][k], np.float64) for k in ("min", "max"))
    win = rng.uniform(lo, hi, (1, cfg.n_obs_steps, cfg.obs_dim))
    act = rng.uniform(alo, ahi, (1, cfg.n_future, cfg.action_dim))
    return torch.from_numpy(win.astype(np.float32)), torch.from_numpy(act.astype(np.float32))


@torch.no_grad()
def world_model_parity(
    model: DiffusionWorldModel, onnx_path: str | os.PathLike, n: int = 8, seed: int = 0
) -> dict:
    """ONNX Runtime vs PyTorch on ``n`` random in-range conditions: per step and per next state."""
    import onnxruntime as ort

    cfg = model.config
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    steps, ts = cfg.num_inference_steps, model.default_timesteps(cfg.num_inference_steps)
    step_abs, step_cos, next_abs, next_cos, norm_abs = [], [], [], [], []
    for _ in range(n):
        win, act = _random_inputs(model, rng)
        cond = model.encode({cfg.obs_key: win, cfg.action_key: act})
        noise = torch.from_numpy(rng.standard_normal((1, *model.target_shape)).astype(np.float32))

        def ort_predict(x, t, cond=cond):
            t1 = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1]
            feed = {"x_t": x.numpy(), "t": t1.numpy(), "cond": cond.numpy()}
            return torch.from_numpy(sess.run(None, feed)[0])

        ref = model.denoise(cond, noise=noise, return_chain=True)
        for s in ref.steps:  # the same input to both, at each step of torch's own chain
            a, b = model.predict(s.x_t, s.t, cond).numpy(), ort_predict(s.x_t, s.t).numpy()
            step_abs.append(float(np.abs(a - b).max()))
            step_cos.append(_cosine(a, b))
        got = sample_loop(
            ort_predict,
            model.path,
            noise,
            parameterization=model.parameterization,
            sampler=cfg.sampler,
            num_steps=steps,
            timesteps=ts,
            generator=torch.Generator().manual_seed(0),
            **model.sampler_kwargs(cfg.sampler),
        )
        norm_abs.append(float((ref.x0 - got.x0).abs().max()))
        a = model.next_from(win, model.unnormalize_target(ref.x0)).numpy()
        b = model.next_from(win, model.unnormalize_target(got.x0)).numpy()
        next_abs.append(float(np.abs(a - b).max()))
        next_cos.append(_cosine(a, b))
    return {
        "n_conditions": n,
        "sampler": cfg.sampler,
        "num_steps": steps,
        "step_max_abs": max(step_abs),
        "step_min_cosine": min(step_cos),
        "next_max_abs_normalized": max(norm_abs),
        "next_max_abs_raw": max(next_abs),
        "next_min_cosine": min(next_cos),
    }


def export_world_model(
    model: DiffusionWorldModel,
    out_dir: str | os.PathLike,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    n_parity: int = 8,
    tol_step: float = 1e-4,
    tol_next: float = 1e-3,
    min_cosine: float = 0.9999,
    seed: int = 0,
    overwrite: bool = False,
    source: str = "",
) -> dict:
    """Write ``OUT/denoiser.onnx``, ``manifest.json`` and ``parity.json`` (see the module doc); returns the
    manifest. ``tol_next`` bounds the next-state difference in normalized target units."""
    if exporter not in EXPORTERS:
        raise VlaflowError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = model.eval()
    cfg = model.config
    with atomic_directory(out_dir, overwrite=overwrite, what="export directory") as tmp:
        ts = model.default_timesteps(cfg.num_inference_steps)
        args = (torch.zeros(1, *model.target_shape), ts[:1].float(), torch.zeros(1, 1, model.cond_dim))
        with torch.no_grad():
            export_graph(
                _DenoiserGraph(model),
                args,
                tmp / DENOISER,
                ["x_t", "t", "cond"],
                ["x0"],
                opset=opset,
                exporter=exporter,
            )
        parity = world_model_parity(model, tmp / DENOISER, n_parity, seed)
        parity["thresholds"] = {"tol_step": tol_step, "tol_next": tol_next, "min_cosine": min_cosine}
        bad = [
            f"{k} {parity[k]:.3g} > {tol}"
            for k, tol in (("step_max_abs", tol_step), ("next_max_abs_normalized", tol_next))
            if not parity[k] <= tol
        ] + [
            f"{k} {parity[k]:.6f} < {min_cosine}"
            for k in ("step_min_cosine", "next_min_cosine")
            if not parity[k] >= min_cosine
        ]
        (tmp / PARITY).write_text(json.dumps(parity, indent=1))
        if bad:
            raise VlaflowError(f"world-model ONNX parity failed: {'; '.join(bad)}; nothing written")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": source,
            "exporter": exporter,
            "opset": opset,
            "config": cfg.to_dict(),
            "normalizer": model.normalizer.to_dict(),
            "graphs": {
                "denoiser": {
                    "file": DENOISER,
                    "inputs": {
                        "x_t": [1, *model.target_shape],
                        "t": [1],
                        "cond": [1, 1, int(model.cond_dim)],
                    },
                    "outputs": {"x0": [1, *model.target_shape]},
                    "parameterization": "x0 (EDM-preconditioned), normalized target units",
                }
            },
            "sampler": {"name": cfg.sampler, "steps": cfg.num_inference_steps, "timesteps": ts.tolist()},
            "condition": "host: [normalized To-window; sin/cos of angle dims; two-hot/continuous actions]",
            "parity": {k: v for k, v in parity.items() if k != "thresholds"},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
