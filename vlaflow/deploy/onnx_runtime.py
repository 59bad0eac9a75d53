"""Torch-free runtime for ``vlaflow export`` directories: numpy + onnxruntime (+ json), nothing else heavy.

    from vlaflow.deploy.onnx_runtime import OnnxPolicy
    p = OnnxPolicy(DIR, providers=["CPUExecutionProvider"])      # or CUDA / TensorRT execution providers
    p.reset(seed=0)
    chunk = p.infer({"obs.keypoint": kp, "obs.agent_pos": pos})  # (To, 9, 2), (To, 2) -> (H, Da)

Same ``infer`` / ``reset`` / ``config`` interface as :func:`vlaflow.load_policy`. Per control step: normalize
the low-dim windows (numpy :class:`~vlaflow.data.normalize.Normalizer`), run ``encoder.onnx`` once, append the
language token of ``obs["task"]`` (stored at export), run the sampler loop of
:mod:`vlaflow.deploy.np_sampling` in float32 with one ``denoiser.onnx`` call per step (or one call of
``unrolled.onnx`` when it matches the sampler asked for), un-normalize. Batch size 1, as exported.

A composed (GPC) export holds one export per parent under ``parents/<i>/`` and its manifest a
``composition`` entry: ``encode`` runs every parent's encoder and packs their conditions into one (1, F)
array like ``ComposedPolicy.encode``, ``predict`` runs the active parents' denoisers at matched noise level
and mixes them on the host (:mod:`vlaflow.deploy.np_compose`); the sampler loop, RTI and the harness see
one policy.

A steered (DSRL-refined) export is its base's export plus ``noise_actor.onnx`` (manifest ``steering``): the
initial noise of each chunk is the actor's deterministic ``cond -> noise`` instead of a Gaussian draw, and
the base's sampler loop (or unrolled graph) denoises it, as ``SteeredPolicy`` does in PyTorch. The
generator below then only feeds a stochastic sampler's per-step noise (DDPM). RTI-DP does not apply
(:class:`~vlaflow.deploy.onnx_rti.OnnxRTIPolicy` refuses it): it replaces the initial noise.

Noise comes from ``numpy.random.default_rng(seed)`` (re-seeded by ``reset(seed)``): the same seed gives the
same actions here, but not the same as PyTorch's generator (parity is checked with shared noise at export).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.deploy import np_compose
from vlaflow.deploy import np_sampling as nps
from vlaflow.errors import VlaflowError
from vlaflow.interfaces import InferResult, RuntimeSpec, obs_window

MANIFEST = "manifest.json"
FORMAT, VERSION = "vlaflow.onnx_policy", 1
# Short names -> provider lists with a CPU fallback. "cuda" turns TF32 off: with TF32 (onnxruntime's
# default on Ampere/Hopper) a DDIM-10 chunk of the PushT U-Net moved 2.2e-3 from the CPU result on an
# H100, over the export's parity threshold; without it, 3e-6 (benchmarks/results/onnx_cuda.json).
PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
    "tensorrt": [
        "TensorrtExecutionProvider",
        ("CUDAExecutionProvider", {"use_tf32": "0"}),
        "CPUExecutionProvider",
    ],
}


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise VlaflowError(
            f"{directory}: not an ONNX policy export (no {MANIFEST}); run `vlaflow export` first"
        )
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise VlaflowError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version", 0) > VERSION:
        raise VlaflowError(f"{path}: export version {m.get('version')} is newer than supported {VERSION}")
    return m


def confined(directory: Path, rel: str, what: str) -> Path:
    """``directory / rel`` when it stays inside ``directory`` (no absolute path, no ``..`` out of it, no
    symlink out of it): a manifest names files of its own export and nothing else on the machine."""
    root = directory.resolve()
    target = (directory / rel).resolve()
    if Path(rel).is_absolute() or (target != root and root not in target.parents):
        raise VlaflowError(f"{directory}: {MANIFEST} names {what} {rel!r}, outside the export directory")
    return directory / rel


def check_inputs(session, path: Path, expected: dict[str, Sequence[int]]) -> None:
    """The graph's inputs are the manifest's, with the manifest's shapes (fixed dimensions compared; a
    dynamic one, a name or None, matches anything). A mismatch is an error naming graph, input, both."""
    have = {i.name: i.shape for i in session.get_inputs()}
    if set(have) != set(expected):
        raise VlaflowError(
            f"{path}: the graph's inputs are {sorted(have)}, {MANIFEST} says {sorted(expected)}"
        )
    for name, want in expected.items():
        got = list(have[name])
        fixed = [isinstance(g, int) for g in got]
        if len(got) != len(want) or any(f and g != int(w) for f, g, w in zip(fixed, got, want, strict=False)):
            raise VlaflowError(
                f"{path}: input {name!r} has shape {got}; {MANIFEST} and the policy spec need {list(want)}"
            )


def resolve_providers(providers: Sequence | None) -> list:
    """Provider names, (name, options) pairs or aliases (cpu, cuda, tensorrt) -> the session's list.

    Asking for a provider this onnxruntime build lacks is an error naming the ones it has (onnxruntime would
    otherwise fall back to the CPU silently, and a latency number would lie about where it ran).
    """
    import onnxruntime as ort

    names: list = []
    for p in providers or ["cpu"]:
        alias = PROVIDER_ALIASES.get(p.lower()) if isinstance(p, str) else None
        names += [q for q in alias or [p] if q not in names]
    have = ort.get_available_providers()
    for p in names:
        name = p[0] if isinstance(p, tuple) else p
        if name not in have:
            raise VlaflowError(
                f"onnxruntime execution provider {name!r} is not available in this build; available: {have} "
                "(CUDA needs the onnxruntime-gpu package, TensorRT also needs TensorRT libraries)"
            )
    return names


def session_options(threads: int = 1, optimize: bool = True):
    """Single-thread, all graph optimizations: batch-1 denoisers are latency-bound, not throughput-bound."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return so


class OnnxPolicy:
    """An exported policy: ``infer(obs) -> (H, Da)`` float32 raw actions through onnxruntime."""

    def __init__(
        self,
        directory: str | os.PathLike,
        providers: Sequence[str] | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        seed: int | None = None,
        threads: int = 1,
        use_unrolled: bool | None = None,
    ):
        import onnxruntime as ort

        self.directory = Path(directory)
        m = self.manifest = read_manifest(directory)
        s = m["spec"]
        self._spec = RuntimeSpec(
            n_obs_steps=int(s["n_obs_steps"]),
            horizon=int(s["horizon"]),
            n_action_steps=int(s["n_action_steps"]),
            obs_shapes={k: tuple(v) for k, v in s["obs_shapes"].items()},
            action_dim=int(s["action_dim"]),
            fps=float(s["fps"]),
            task=s.get("task", ""),
            extra={**s.get("extra", {}), "runtime": "onnxruntime"},
        )
        self.normalizer = Normalizer.from_dict(m["normalizer"])
        p = m["path"]
        self.path = (
            nps.NpVPPath(np.asarray(p["alphas_cumprod"], np.float32))
            if p["kind"] == "vp"
            else nps.NpFlowPath()
        )
        self.parameterization = m["parameterization"]
        self.providers = resolve_providers(providers)
        so = session_options(threads)
        graphs = m["graphs"]

        # an imported LeRobot policy's network chunk starts action_offset steps in the past (dropped in infer)
        self.action_offset = int(s.get("extra", {}).get("action_offset", 0))
        horizon, da = self._spec.horizon + self.action_offset, self._spec.action_dim
        cond = m.get("cond") or {}
        cond_shape = [1, int(cond.get("n_tokens", 0)), int(cond.get("dim", 0))]
        for e in graphs.get("encoder", {}).get("inputs", []):  # the manifest agrees with its own spec
            want = [1, self._spec.n_obs_steps, *self._spec.obs_shapes.get(e["key"], ())]
            if list(e["shape"]) != want:
                raise VlaflowError(
                    f"{self.directory}: {MANIFEST} gives encoder input {e['key']!r} shape {e['shape']}, "
                    f"its spec {want}"
                )
        # a VLA prefix graph also reads the instruction's token ids and mask (1, T), from the manifest
        text = {t: v for t, v in (m.get("prefix_text") or {}).get("tokens", {}).items()}
        self.prefix_text = {
            t: (np.asarray([v["ids"]], np.int64), np.asarray([v["mask"]], np.int64)) for t, v in text.items()
        } or None
        text_shapes = {}
        if self.prefix_text is not None:
            n_text = len(next(iter(text.values()))["ids"])
            text_shapes = {n: [1, n_text] for n in graphs["encoder"].get("text_inputs", ())}
        expected = {
            "encoder": {
                **{e["name"]: e["shape"] for e in graphs.get("encoder", {}).get("inputs", [])},
                **text_shapes,
            },
            "denoiser": {"x_t": [1, horizon, da], "t": [1], "cond": cond_shape},
            "unrolled": {"cond": cond_shape, "noise": [1, horizon, da]},
            "noise_actor": {"cond": cond_shape},
        }

        def session(name):
            f = confined(self.directory, graphs[name]["file"], f"graph file of {name!r}")
            if not f.is_file():
                raise VlaflowError(f"{self.directory}: {graphs[name]['file']} named in {MANIFEST} is missing")
            sess = ort.InferenceSession(str(f), so, providers=self.providers)
            check_inputs(sess, f, expected[name])
            return sess

        comp = self.composition = m.get("composition")
        self.parents: list[OnnxPolicy] | None = None
        if comp is not None:  # GPC: one export per parent, mixed here
            self.parents = [
                OnnxPolicy(
                    confined(self.directory, e["dir"], "parent export"),
                    providers=self.providers,
                    threads=threads,
                    use_unrolled=False,
                )
                for e in comp["parents"]
            ]
            self._cond_sizes = [
                int(q.manifest["cond"]["n_tokens"]) * int(q.manifest["cond"]["dim"]) for q in self.parents
            ]
            self.encoder = self.denoiser = self.unrolled = self.noise_actor = None
            self.enc_inputs, self.lang_tokens = [], None
        else:
            self.encoder, self.denoiser = session("encoder"), session("denoiser")
            self.enc_inputs = graphs["encoder"]["inputs"]
            self.unrolled = (
                session("unrolled") if "unrolled" in graphs and use_unrolled is not False else None
            )
            steering = m.get("steering")
            self.noise_actor = session(steering["graph"]) if steering is not None else None
            if steering is not None and list(steering.get("noise_shape", [])) != [1, horizon, da]:
                raise VlaflowError(
                    f"{self.directory}: {MANIFEST} gives the noise actor's output shape "
                    f"{steering.get('noise_shape')}, the spec needs {[1, horizon, da]}"
                )
            lang = m.get("language")
            self.lang_tokens = (
                {t: np.asarray(v, np.float32) for t, v in lang["tokens"].items()} if lang else None
            )
        self.sampler = sampler or m["sampler"]["name"]
        self.num_steps = int(num_steps or m["sampler"]["num_steps"])
        if self.sampler not in nps.SAMPLERS:
            raise VlaflowError(f"the ONNX runtime's samplers are {nps.SAMPLERS}, got {self.sampler!r}")
        opt = m.get("sampler_options", {}).get(self.sampler) or (
            m["sampler"] if m["sampler"]["name"] == self.sampler else {}
        )
        self.eta = float(opt.get("eta", 0.0))
        self.clip_x0 = opt.get("clip_x0")
        if self.sampler in ("ddpm", "ddim") and self.path.kind == "vp" and not opt:
            raise VlaflowError(f"{self.directory}: no settings for sampler {self.sampler!r} in {MANIFEST}")
        u = graphs.get("unrolled", {}).get("sampler", {})
        self._use_unrolled = (
            self.unrolled is not None
            and u.get("name") == self.sampler
            and u.get("num_steps") == self.num_steps
        )
        if use_unrolled and not self._use_unrolled:
            raise VlaflowError(
                f"use_unrolled=True but the unrolled graph runs {u.get('name')}:{u.get('num_steps')}, "
                f"not {self.sampler}:{self.num_steps}"
            )
        self.seed = seed
        self.last_nfe = 0
        self.reset()

    @property
    def config(self) -> RuntimeSpec:
        return self._spec

    @property
    def steered(self) -> bool:
        """A DSRL-refined export: the noise actor chooses each chunk's initial noise."""
        return self.noise_actor is not None

    @property
    def uses_unrolled(self) -> bool:
        """``infer`` runs the unrolled graph (it matches the sampler and steps asked for)."""
        return self._use_unrolled

    def reset(self, seed: int | None = None) -> None:
        """Start of an episode; ``seed`` (or the constructor's) re-seeds the noise generator."""
        s = seed if seed is not None else self.seed
        self._rng = np.random.default_rng(s)

    # -- pieces (also used by the export parity check) --------------------------------------------------
    def encode(self, obs: dict[str, Any]) -> np.ndarray:
        """Raw obs window (To, ...) per key [+ "task"] -> cond (1, Nc, Fc); composed: packed (1, F)."""
        spec = self._spec
        window = obs_window(spec, obs)
        if self.parents is not None:  # each parent on its own keys and window, as ComposedPolicy.encode
            return np.concatenate([q.encode(window).reshape(1, -1) for q in self.parents], axis=1)
        feed = {}
        for e in self.enc_inputs:
            k = e["key"]
            x = window[k]
            if e["dtype"] == "uint8":
                if x.dtype != np.uint8:
                    raise VlaflowError(f"image {k!r} must be uint8 (0..255), got {x.dtype}")
            else:
                x = x.astype(np.float32)
                if e["normalize"]:
                    x = self.normalizer.normalize(k, x).astype(np.float32)
            feed[e["name"]] = np.ascontiguousarray(x[None])
        if self.prefix_text is not None:  # VLA: the instruction as token ids (the tokenizer stays home)
            text = str(obs.get(K.TASK) or spec.task)
            if text not in self.prefix_text:
                raise VlaflowError(
                    f"instruction {text!r} was not known at export time (the tokenizer is not exported); "
                    f"known: {sorted(self.prefix_text)}"
                )
            names = self.manifest["graphs"]["encoder"]["text_inputs"]
            feed.update(zip(names, self.prefix_text[text], strict=True))
        cond = self.encoder.run(None, feed)[0]  # (1, To, Fc); VLA: the prefix KV cache (1, P, Fc)
        if self.lang_tokens is not None:
            text = str(obs.get(K.TASK) or spec.task)
            if text not in self.lang_tokens:
                raise VlaflowError(
                    f"instruction {text!r} was not known at export time (the text encoder is not exported); "
                    f"known: {sorted(self.lang_tokens)}"
                )
            cond = np.concatenate([cond, self.lang_tokens[text][None, None]], axis=1)
        return cond.astype(np.float32)

    def predict(self, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """One denoiser evaluation: native prediction (1, H, Da); composed: the parents' mix in its space."""
        if self.parents is not None:
            comp = self.composition
            entries = comp["parents"]
            if cond.shape[-1] != sum(self._cond_sizes):
                raise VlaflowError(
                    f"composed cond has width {cond.shape[-1]}, expected {sum(self._cond_sizes)}"
                )
            cuts = np.cumsum(self._cond_sizes)[:-1]
            conds = [
                c.reshape(1, int(q.manifest["cond"]["n_tokens"]), int(q.manifest["cond"]["dim"]))
                for c, q in zip(
                    np.split(np.asarray(cond, np.float32), cuts, axis=1), self.parents, strict=True
                )
            ]
            return np_compose.mix_predictions(
                self.parents,
                conds,
                comp["weights"],
                int(comp["reference"]),
                comp["space"],
                x_t,
                t,
                [e["clip_x0"] for e in entries],
                [bool(e["same_path_as_reference"]) for e in entries],
            )
        feed = {"x_t": np.asarray(x_t, np.float32), "t": np.asarray(t, np.float32).reshape(1), "cond": cond}
        return self.denoiser.run(None, feed)[0]

    def timesteps(self, sampler: str, num_steps: int) -> np.ndarray:
        m = self.manifest
        if sampler == "onestep":
            if m["sampler"]["name"] != "onestep":
                raise VlaflowError(f"{self.directory}: 'onestep' needs a consistency student export")
            return np.asarray(m["timesteps"][:1], np.float32)
        if m["sampler"]["num_steps"] == num_steps and len(m.get("timesteps", [])) == num_steps + 1:
            return np.asarray(m["timesteps"], np.float32)  # the exporter's own grid
        return self.path.timesteps(num_steps)

    def denoise(
        self,
        cond: np.ndarray,
        noise: np.ndarray,
        sampler: str | None = None,
        num_steps: int | None = None,
        step_noise=None,
    ) -> np.ndarray:
        """Normalized clean chunk (1, H, Da) from ``noise`` (1, H, Da); counts ``last_nfe``."""
        sampler = sampler or self.sampler
        steps = int(num_steps or self.num_steps)
        opt = self.manifest.get("sampler_options", {}).get(sampler, {})
        eta = float(opt.get("eta", self.eta if sampler == self.sampler else 0.0))
        clip = opt.get("clip_x0", self.clip_x0 if sampler in ("ddpm", "ddim") else None)
        if step_noise is None:

            def step_noise(i, shape):
                return self._rng.standard_normal(shape, dtype=np.float32)

        x0, nfe = nps.sample_loop(
            lambda x, t: self.predict(x, t, cond),
            self.path,
            noise,
            parameterization=self.parameterization,
            sampler=sampler,
            timesteps=self.timesteps(sampler, steps),
            eta=eta,
            clip_x0=clip,
            step_noise=step_noise,
        )
        self.last_nfe = nfe
        return x0

    def initial_noise(self, cond: np.ndarray) -> np.ndarray:
        """A chunk's initial noise (1, H, Da): the noise actor's for ``cond`` (steered), else N(0, I)."""
        shape = (1, self._spec.horizon + self.action_offset, self._spec.action_dim)
        if self.noise_actor is not None:
            w = self.noise_actor.run(None, {"cond": np.asarray(cond, np.float32)})[0]
            return np.asarray(w, np.float32).reshape(shape)
        return self._rng.standard_normal(shape, dtype=np.float32)

    def run_unrolled(self, cond: np.ndarray, noise: np.ndarray) -> np.ndarray:
        if self.unrolled is None:
            raise VlaflowError(
                f"{self.directory}: exported without an unrolled graph (vlaflow export --unrolled K)"
            )
        self.last_nfe = int(self.manifest["graphs"]["unrolled"]["sampler"]["num_steps"])
        return self.unrolled.run(None, {"cond": cond, "noise": np.asarray(noise, np.float32)})[0]

    def unnormalize_action(self, x: np.ndarray) -> np.ndarray:
        if self.parents is not None:  # the reference parent's statistics, as ComposedPolicy
            return self.parents[int(self.composition["reference"])].unnormalize_action(x)
        return self.normalizer.unnormalize(K.ACTION, x) if K.ACTION in self.normalizer.modes else x

    # -- the runtime interface ------------------------------------------------------------------------
    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult:
        """obs: arrays with leading To per key (plus optional ``task`` str) -> (H, Da) float32 raw actions.

        ``shift`` / ``delay`` are accepted for the runtime interface and unused: every call samples afresh.
        """
        cond = self.encode(obs)
        noise = self.initial_noise(cond)
        x0 = self.run_unrolled(cond, noise) if self._use_unrolled else self.denoise(cond, noise)
        chunk = self.unnormalize_action(x0[0])[self.action_offset :]  # (H, Da) from the current step
        return InferResult(np.asarray(chunk, np.float32), nfe=self.last_nfe)


def load_onnx_policy(directory: str | os.PathLike, **kwargs) -> OnnxPolicy:
    """``OnnxPolicy(directory, **kwargs)``; a picklable factory target for the sim harness's workers."""
    return OnnxPolicy(directory, **kwargs)
