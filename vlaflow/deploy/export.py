"""A denoising policy as ONNX graphs plus a JSON manifest, checked against PyTorch before anything is
written (``vlaflow export CKPT --out DIR``, in :mod:`vlaflow.cli.export`).

What goes where (Nc condition tokens of width Fc, To obs steps, H chunk, Da action dim; batch fixed to 1):

- ``encoder.onnx``  : normalized low-dim windows (1, To, *shape) float32 and uint8 camera windows
  (1, To, h, w, 3) -> ``cond`` (1, To, Fc). Normalization stays on the host (numpy ``Normalizer``).
- ``denoiser.onnx`` : ``predict(x_t (1, H, Da), t (1,), cond (1, Nc, Fc))`` in the family's native
  parameterization (eps for diffusion, velocity for flow); path time ``t`` is a tensor input, so one graph
  serves every sampler and step count. No Loop op: the sampler loop and its float32 arithmetic run on the
  host (:mod:`vlaflow.deploy.np_sampling`).
- ``unrolled.onnx`` (``--unrolled``): K deterministic sampler steps (DDIM eta=0, Euler, or a consistency
  student's one step) unrolled into one graph, ``(cond, noise) -> x0`` in normalized units (always traced:
  the schedule becomes constants).
- Language: the instruction encoder (a transformers BERT) is not exported. The projected language token of
  every instruction the policy knows (``config.tasks`` and its default task) is computed at export time and
  stored in the manifest; the runtime appends it to ``cond`` and names the known instructions for any other.
- VLA (VLM-prefix) policies: ``encoder.onnx`` is the *prefix graph*: the obs inputs plus the instruction's
  ``text_ids`` / ``text_mask`` (1, T) int64 -> ``cond`` (1, P, Fc), the per-layer KV cache of the prefix;
  ``denoiser.onnx`` is the *expert step graph* ``(x_t, t, cond) -> pred`` taking that cache as an input.
  The tokenizer is not exported: the token ids of every instruction the policy knows are in the manifest
  (``prefix_text``), like the language tokens above.
- Composed (GPC) policies: ``parents/<i>/`` holds a complete export of parent i (its encoder and denoiser
  graphs, manifest and parity report); the composite's manifest has no graphs of its own but a
  ``composition`` entry (weights, reference, mixing space, per parent its directory, clip and whether it
  shares the reference's path). The runtime mixes the parents' predictions on the host in float32 numpy
  (:mod:`vlaflow.deploy.np_compose`); the composite's parity is checked per mixed step and per chunk.
- ``manifest.json`` : graphs + io names, To/H/Ta/obs shapes, path, sampler, steps, normalizer statistics,
  language tokens. ``parity.json``: max-abs and cosine per denoiser step and per chunk against PyTorch for
  fixed noise and several random observations. JSON only, no pickle.
- Steered (DSRL-refined) policies: the frozen base policy's export as above (encoder, denoiser, optional
  unrolled graph, the base's manifest fields and parity rows) plus ``noise_actor.onnx``: ``cond
  (1, Nc, Fc) -> noise (1, H, Da)``, the actor's deterministic noise ``bound * tanh(mean)``. The manifest's
  ``family`` is ``steered`` (``base_family`` names the base) and its ``steering`` entry names the graph; the
  runtime feeds that noise to the base's sampler loop (or unrolled graph) in place of a Gaussian draw.
  ``parity.json`` adds the actor graph (same cond) and the whole steered chunk (ONNX encoder -> ONNX actor
  noise -> ONNX denoising) against PyTorch (``base.encode`` -> ``actor`` -> ``base.denoise``).

A parity failure (thresholds ``--tol-step``, ``--tol-chunk``, ``--min-cosine``) fails the export and leaves
no DIR: everything is written to a temporary sibling directory and renamed into place only when it passed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import vlaflow.keys as K
from vlaflow.atomic import atomic_directory
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.policies.onnx_graph import EXPORTERS, check_graph, export_graph, graph_ops  # noqa: F401

FORMAT = "vlaflow.onnx_policy"
VERSION = 1
MANIFEST, PARITY = "manifest.json", "parity.json"
UNROLLABLE = ("ddim", "euler", "onestep")
# Families with encode + predict(x_t, t, cond) on a Gaussian path (composed: one export per parent, mixed
# on the host). EBT samples by gradient descent on an energy (a backward pass per step): not exported here.
# Steered: the base's graphs + the DSRL noise actor's graph.
EXPORTABLE_FAMILIES = ("diffusion", "flow", "consistency", "composed", "vla", "steered")
TEXT_INPUTS = ("text_ids", "text_mask")  # a VLA prefix graph's instruction inputs (1, T) int64


@dataclass(frozen=True)
class ExportOptions:
    """How to export and how strictly to check it."""

    opset: int = 18  # ONNX opset (>= 17; the dynamo exporter writes 18 at least)
    exporter: str = "dynamo"  # "dynamo" (torch.export, clean graphs) | "torchscript" (tracing, faster export)
    unrolled_steps: int = 0  # > 0: also write unrolled.onnx with this many deterministic sampler steps
    unrolled_sampler: str = ""  # sampler of the unrolled graph ("" = the policy's, if deterministic)
    samplers: tuple[tuple[str, int], ...] = ()  # (sampler, steps) checked for parity; () = family defaults
    n_parity_obs: int = 3  # random observations in the parity check
    tol_step: float = 1e-4  # max |onnx - torch| of one denoiser output (native units)
    tol_chunk: float = 1e-3  # max |onnx - torch| of a full chunk (normalized action units)
    min_cosine: float = 0.9999  # min cosine similarity of every step and chunk
    seed: int = 0  # parity observations and noise

    def __post_init__(self):
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17, got {self.opset}")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.unrolled_steps < 0:
            raise ConfigError(f"unrolled_steps must be >= 0, got {self.unrolled_steps}")
        if self.n_parity_obs < 1:
            raise ConfigError(f"n_parity_obs must be >= 1, got {self.n_parity_obs}")
        for name in ("tol_step", "tol_chunk"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.min_cosine <= 1:
            raise ConfigError(f"min_cosine must be in (0, 1], got {self.min_cosine}")


# ------------------------------------------------------------------------------------------------ graphs
def _modules():
    """torch wrappers around the policy's tensor-only core (built lazily: torch stays out of import time)."""
    import torch
    from torch import nn

    class EncoderGraph(nn.Module):
        def __init__(self, policy, keys: list[str]):
            super().__init__()
            self.enc, self.keys = policy.obs_encoder, keys

        def forward(self, *xs):
            return self.enc(dict(zip(self.keys, xs, strict=True)))  # (1, To, Fc)

    class PrefixGraph(nn.Module):  # a VLA policy's prefix: obs + instruction ids -> KV cache
        def __init__(self, policy, keys: list[str]):
            super().__init__()
            self.policy, self.keys = policy, keys

        def forward(self, *xs):
            window = dict(zip(self.keys, xs[: len(self.keys)], strict=True))
            return self.policy.encode_window(window, xs[-2], xs[-1])  # (1, P, Fc)

    class DenoiserGraph(nn.Module):
        def __init__(self, policy):
            super().__init__()
            self.policy = policy

        def forward(self, x_t, t, cond):
            return self.policy.predict(x_t, t, cond)  # (1, H, Da)

    class UnrolledGraph(nn.Module):
        def __init__(self, policy, sampler: str, steps: int):
            super().__init__()
            self.policy, self.sampler, self.steps = policy, sampler, steps

        def forward(self, cond, noise):
            with torch.no_grad():
                return self.policy.denoise(cond, noise=noise, sampler=self.sampler, num_steps=self.steps).x0

    return EncoderGraph, DenoiserGraph, UnrolledGraph, PrefixGraph


def _actor_graph(policy):
    """A steered policy's noise actor as a graph: cond (1, Nc, Fc) -> its deterministic noise (1, H, Da)."""
    from torch import nn

    class NoiseActorGraph(nn.Module):
        def __init__(self, steered):
            super().__init__()
            self.steered = steered

        def forward(self, cond):
            return self.steered.steer(cond)  # (1, H, Da): bound * tanh(mean), the log-density unused

    return NoiseActorGraph(policy).eval()


def _export_graph(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opts) -> None:
    export_graph(module, args, path, inputs, outputs, opset=opts.opset, exporter=opts.exporter)


# ------------------------------------------------------------------------------------------------ manifest
def _path_manifest(policy) -> dict:
    path = policy.path
    if path.kind == "vp":
        return {
            "kind": "vp",
            "num_train_steps": int(path.num_train_steps),
            "alphas_cumprod": [float(v) for v in path.alphas_cumprod.cpu().numpy()],
        }
    if path.kind == "flow":
        return {"kind": "flow", "time_scale": float(path.time_scale)}
    raise VlaflowError(f"cannot export a policy on path {path.kind!r} (known: vp, flow)")


def _timesteps(policy, sampler: str, steps: int) -> list[float]:
    if sampler == "onestep":
        return [float(policy.config.start_time)]
    return [float(v) for v in policy.path.timesteps(steps)]


def _sampler_manifest(policy, sampler: str, steps: int) -> dict:
    if sampler == "onestep":  # consistency student: one evaluation at the teacher's start time
        c = float(policy.config.clip_sample_range)
        return {"name": "onestep", "num_steps": 1, "eta": 0.0, "clip_x0": c if c > 0 else None}
    kw = policy.sampler_kwargs(sampler)
    return {
        "name": sampler,
        "num_steps": int(steps),
        "eta": float(kw.get("eta", 0.0)),
        "clip_x0": None if kw.get("clip_x0") is None else float(kw["clip_x0"]),
    }


def default_samplers(policy) -> tuple[tuple[str, int], ...]:
    """Parity-checked samplers: the configured one, plus DDPM over the full grid for diffusion policies."""
    cfg = policy.config
    out = [(cfg.sampler, int(cfg.num_inference_steps))]
    if policy.path.kind == "vp" and cfg.sampler not in ("ddpm", "onestep"):
        out.append(("ddpm", int(policy.path.num_train_steps)))
    return tuple(out)


def _language_tokens(policy) -> dict[str, list[float]] | None:
    import torch

    if policy.text_encoder is None:
        return None
    texts = list(dict.fromkeys([*policy.config.tasks, *([policy.spec.task] if policy.spec.task else [])]))
    if not texts:
        raise VlaflowError(
            "a language-conditioned policy without config.tasks cannot be exported: the instruction encoder "
            "is not exported, so the instructions must be known at export time"
        )
    with torch.inference_mode():
        tok = policy.lang_proj(policy.text_encoder(texts)).float().cpu().numpy()  # (n_tasks, Fc)
    return {t: [float(v) for v in row] for t, row in zip(texts, tok, strict=True)}


def _enc_inputs(policy) -> list[dict]:
    cfg = policy.config
    out = []
    for i, (k, shape) in enumerate(cfg.obs_shapes.items()):
        image = K.is_image(k)
        out.append(
            {
                "name": f"obs_{i}",
                "key": k,
                "shape": [1, cfg.n_obs_steps, *map(int, shape)],
                "dtype": "uint8" if image else "float32",
                "normalize": (not image) and k in policy.normalizer.modes,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------ export
def export_policy(
    policy, out: str | os.PathLike, opts: ExportOptions | None = None, source: str = ""
) -> dict:
    """Export ``policy`` to ``out`` (must not exist or be an earlier export); returns the parity report.

    A composed (GPC) policy is exported as one export per parent under ``parents/<i>/`` (each with its own
    encoder and denoiser graphs and parity report) plus a manifest whose ``composition`` lists them; the
    runtime mixes their predictions on the host, and the composite's parity is checked per step (the mixed
    prediction) and per chunk like any policy's.
    """
    from vlaflow.deploy.parity import check_parity, check_steered_parity

    opts = opts or ExportOptions()
    dest = Path(out)
    if dest.exists() and not (dest / MANIFEST).is_file():
        raise VlaflowError(f"{dest} exists and is not an ONNX export (no {MANIFEST}); refusing to replace it")
    family = getattr(policy.config, "family", "")
    if family not in EXPORTABLE_FAMILIES:
        raise VlaflowError(f"cannot export a {family!r} policy; exportable families: {EXPORTABLE_FAMILIES}")
    steered = policy.cpu().eval() if family == "steered" else None
    # a steered policy's graphs (all but the actor's), manifest fields and parity rows are its frozen base's
    policy = steered.base if steered is not None else policy.cpu().eval()
    if policy.path.kind not in ("vp", "flow"):
        raise VlaflowError(f"cannot export path {policy.path.kind!r}")
    cfg = policy.config
    samplers = opts.samplers or default_samplers(policy)
    unrolled_sampler = ""
    if opts.unrolled_steps and family == "composed":
        raise ConfigError(
            "a composed policy mixes its parents' predictions on the host: it has no unrolled graph "
            "(export without --unrolled)"
        )
    if opts.unrolled_steps:
        unrolled_sampler = opts.unrolled_sampler or cfg.sampler
        if unrolled_sampler not in UNROLLABLE or policy.sampler_kwargs(unrolled_sampler).get("eta", 0.0):
            raise ConfigError(
                f"an unrolled graph needs a deterministic sampler {UNROLLABLE} (eta 0), "
                f"got {unrolled_sampler!r}"
            )
    with atomic_directory(dest, overwrite=True) as tmp:
        manifest = _common_manifest(policy, samplers, opts, source)
        if family == "composed":
            manifest.update(_export_parents(policy, tmp, opts, source))
        else:
            manifest.update(_export_graphs(policy, tmp, opts, unrolled_sampler))
        if steered is not None:
            _add_noise_actor(steered, tmp, manifest, opts)
        for g in manifest["graphs"].values():
            g["ops"] = graph_ops(tmp / g["file"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        report = check_parity(policy.eval(), tmp, samplers, opts)
        if steered is not None:
            check_steered_parity(steered, tmp, opts, report)
        if family == "composed":
            report["parents"] = [
                {"dir": e["dir"], **json.loads((tmp / e["dir"] / PARITY).read_text())}
                for e in manifest["composition"]["parents"]
            ]
        (tmp / PARITY).write_text(json.dumps(report, indent=1))
        if not report["passed"]:
            raise VlaflowError(
                f"ONNX parity check failed, nothing written to {dest}: " + "; ".join(report["failures"][:6])
            )
    return report


def _common_manifest(policy, samplers, opts: ExportOptions, source: str) -> dict:
    """What every export's manifest says: spec, path, samplers, time grid, normalizer, provenance."""
    import torch

    cfg, spec = policy.config, policy.spec
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": str(source),
        "family": cfg.family,
        "parameterization": policy.parameterization,
        "spec": {
            "n_obs_steps": spec.n_obs_steps,
            "horizon": spec.horizon,
            "n_action_steps": spec.n_action_steps,
            "obs_shapes": {k: list(map(int, v)) for k, v in spec.obs_shapes.items()},
            "action_dim": spec.action_dim,
            "fps": float(spec.fps),
            "task": spec.task,
            "extra": dict(spec.extra),
        },
        "path": _path_manifest(policy),
        "sampler": _sampler_manifest(policy, cfg.sampler, cfg.num_inference_steps),
        "sampler_options": {s: _sampler_manifest(policy, s, n) for s, n in samplers},
        "timesteps": _timesteps(policy, cfg.sampler, cfg.num_inference_steps),
        "normalizer": policy.normalizer.to_dict(),
        "batch_size": 1,
        "exporter": opts.exporter,
        "opset": opts.opset,
        "torch_version": torch.__version__,
    }


def _export_graphs(policy, tmp: Path, opts: ExportOptions, unrolled_sampler: str) -> dict:
    """A single policy's encoder / denoiser (/ unrolled) graphs into ``tmp``; their part of the manifest."""
    import torch

    cfg = policy.config
    EncoderGraph, DenoiserGraph, UnrolledGraph, PrefixGraph = _modules()
    enc_inputs = _enc_inputs(policy)
    vla = cfg.family == "vla"
    rng = np.random.default_rng(opts.seed)
    dummy = tuple(
        torch.from_numpy(
            rng.integers(0, 256, size=e["shape"], dtype=np.uint8)
            if e["dtype"] == "uint8"
            else rng.uniform(-1, 1, size=e["shape"]).astype(np.float32)
        )
        for e in enc_inputs
    )
    names = [e["name"] for e in enc_inputs]
    prefix_text = None
    with torch.no_grad():
        if vla:
            prefix_text = policy.instruction_tokens()
            if not prefix_text:
                raise VlaflowError(
                    "a VLA policy without config.tasks cannot be exported: the tokenizer is not exported, so "
                    "the instructions must be known at export time"
                )
            ids, mask = (torch.tensor([v], dtype=torch.long) for v in next(iter(prefix_text.values())))
            enc_mod = PrefixGraph(policy, [e["key"] for e in enc_inputs]).eval()
            dummy = (*dummy, ids, mask)
            _export_graph(enc_mod, dummy, tmp / "encoder.onnx", [*names, *TEXT_INPUTS], ["cond"], opts)
            cond = enc_mod(*dummy)  # (1, P, Fc): the real cache layout (its validity column included)
        else:
            enc_mod = EncoderGraph(policy, [e["key"] for e in enc_inputs]).eval()
            _export_graph(enc_mod, dummy, tmp / "encoder.onnx", names, ["cond"], opts)
            cond = torch.randn(1, policy.n_cond_tokens, policy.cond_dim)  # (1, Nc, Fc)
        x = torch.randn(1, cfg.horizon, cfg.action_dim)
        t0 = torch.tensor(_timesteps(policy, cfg.sampler, cfg.num_inference_steps)[:1])
        _export_graph(
            DenoiserGraph(policy), (x, t0, cond), tmp / "denoiser.onnx", ["x_t", "t", "cond"], ["pred"], opts
        )
        if opts.unrolled_steps:
            unr = UnrolledGraph(policy, unrolled_sampler, opts.unrolled_steps)
            # Traced (TorchScript exporter) whatever --exporter says: tracing folds the fixed schedule
            # coefficients into constants, where torch.export meets the schedule's cumprod and stops.
            traced = dataclasses.replace(opts, exporter="torchscript")
            _export_graph(unr, (cond, x), tmp / "unrolled.onnx", ["cond", "noise"], ["x0"], traced)
    part = {
        "cond": {"n_tokens": int(cond.shape[1]), "dim": int(cond.shape[2])},
        "language": {"tokens": _language_tokens(policy)} if policy.text_encoder is not None else None,
        "graphs": {
            "encoder": {"file": "encoder.onnx", "inputs": enc_inputs, "outputs": ["cond"]},
            "denoiser": {"file": "denoiser.onnx", "inputs": ["x_t", "t", "cond"], "outputs": ["pred"]},
        },
    }
    if prefix_text is not None:
        part["prefix_text"] = {"tokens": {t: {"ids": i, "mask": m} for t, (i, m) in prefix_text.items()}}
        part["graphs"]["encoder"]["text_inputs"] = list(TEXT_INPUTS)
    if opts.unrolled_steps:
        part["graphs"]["unrolled"] = {
            "file": "unrolled.onnx",
            "inputs": ["cond", "noise"],
            "outputs": ["x0"],
            "sampler": _sampler_manifest(policy, unrolled_sampler, opts.unrolled_steps),
            "exporter": "torchscript",
        }
    return part


def _add_noise_actor(steered, tmp: Path, manifest: dict, opts: ExportOptions) -> None:
    """``noise_actor.onnx`` of a steered policy into ``tmp``; the manifest (the base's) says it is steered."""
    import torch

    base = steered.base
    cond = torch.randn(1, manifest["cond"]["n_tokens"], manifest["cond"]["dim"])  # (1, Nc, Fc)
    with torch.no_grad():
        _export_graph(_actor_graph(steered), (cond,), tmp / "noise_actor.onnx", ["cond"], ["noise"], opts)
    manifest["family"] = "steered"
    manifest["base_family"] = base.config.family
    manifest["spec"]["extra"] = dict(steered.spec.extra)  # family steered, base_family, bound
    manifest["graphs"]["noise_actor"] = {"file": "noise_actor.onnx", "inputs": ["cond"], "outputs": ["noise"]}
    manifest["steering"] = {
        "graph": "noise_actor",
        "noise_shape": [1, *map(int, base.target_shape)],  # (1, H, Da)
        "bound": float(steered.actor.bound),
        "deterministic": True,  # the actor's mean through the bound, as SteeredPolicy and SteeredRuntime
    }


def _export_parents(policy, tmp: Path, opts: ExportOptions, source: str) -> dict:
    """A composed policy's parents, each a complete export (graphs + its own parity check at its own sampler)
    under ``tmp/parents/<i>``; the ``composition`` part of the manifest (what the host mixing needs)."""
    from vlaflow.policies.compose import parent_clip

    (tmp / "parents").mkdir()
    entries = []
    for i, p in enumerate(policy.parents):
        sub = f"parents/{i}"
        pc = p.config
        popts = dataclasses.replace(
            opts, samplers=((pc.sampler, int(pc.num_inference_steps)),), unrolled_steps=0, unrolled_sampler=""
        )
        export_policy(p, tmp / sub, popts, source=f"{source}#parents.{i}")
        clip = parent_clip(p)
        entries.append(
            {
                "dir": sub,
                "family": pc.family,
                "parameterization": p.parameterization,
                "clip_x0": None if clip is None else float(clip),
                # decided here by PyTorch's path equality, so the host takes the same branch as the torch mix
                "same_path_as_reference": bool(p.path == policy.path),
            }
        )
    return {
        "composition": {
            "weights": [float(w) for w in policy.config.weights],
            "reference": int(policy.reference),
            "space": policy.parameterization,
            "parents": entries,
        },
        "graphs": {},
    }
