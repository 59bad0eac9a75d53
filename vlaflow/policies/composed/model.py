"""A GPC-composed policy on the denoising contract, so RTI-DP, RTC, ONNX export and RL take it unchanged.

Shapes: B batch, To observation steps (the longest parent window), H chunk length, Da action dim;
parent i reads its own keys and window and encodes them to Nc_i tokens of width Fc_i; F = sum_i Nc_i * Fc_i.

The contract (:class:`vlaflow.policies.contract.DenoisingPolicyContract`), as the composite implements it:

- ``path``: the reference parent's (its path, time grid and sampler options drive the composite)
- ``parameterization``: the mixing space (``config.space``, default the reference's native one)
- ``encode(obs) -> cond`` (B, F): every parent's own condition, flattened and concatenated in parent order.
  One tensor, not a list, so code written for a single policy (RTC's ``cond.shape[0]``, device moves,
  batch indexing in RL, the export's parity check) needs no case for composites; :meth:`split_cond` undoes it.
- ``predict(x_t, t, cond) -> (B, H, Da)``: :func:`vlaflow.policies.compose.mix_predictions`, each parent
  queried at matched noise level on its own path, predictions mixed with the convex weights
- ``denoise`` / ``generate`` / ``sample`` / ``sampler_kwargs`` / ``unnormalize_action`` as every family

The parents are sub-modules, handed in already built (by ``registry.build_policy`` from the embedded
configs, or by :func:`compose_policies` from loaded parents), so this module never imports the registry.
A composed checkpoint is self-contained: config.json embeds every parent's config, model.safetensors holds
``parents.<i>.*`` weights, normalizer.json the union of their statistics (which must agree key by key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import vlaflow.keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.compose import default_reference, mix_predictions, parent_clip
from vlaflow.policies.composed.config import PARENT_FAMILIES, ComposedConfig
from vlaflow.policies.contract import Generation, check_stats
from vlaflow.policies.denoising import GenerativeModule
from vlaflow.policies.path import GaussianPath
from vlaflow.policies.samplers import SampleResult, sample_loop


class ComposedPolicy(GenerativeModule):
    config_class = ComposedConfig
    config: ComposedConfig
    text_encoder = None  # language conditioning lives in the parents (each appends its own token)

    def __init__(self, config: ComposedConfig, stats: dict, parents: Sequence[nn.Module]):
        super().__init__()
        check_stats(config, stats)
        parents = list(parents)
        if len(parents) != len(config.parent_configs):
            raise VlaflowError(
                f"got {len(parents)} parent policies for a config with {len(config.parent_configs)} parents"
            )
        for i, (p, d) in enumerate(zip(parents, config.parent_configs, strict=True)):
            if p.config.family != d.get("family") or p.config.family not in PARENT_FAMILIES:
                raise VlaflowError(
                    f"parent {i} is a {p.config.family!r} policy, its embedded config says "
                    f"{d.get('family')!r} (composition needs {', '.join(PARENT_FAMILIES)} parents)"
                )
        self.config = config
        self.normalizer = Normalizer(stats, config.norm_modes())
        self.parents = nn.ModuleList(parents)
        self.reference = config.reference_index
        self._clips = [parent_clip(p) for p in parents]
        self._cond_shapes = [(int(p.n_cond_tokens), int(p.cond_dim)) for p in parents]  # (Nc_i, Fc_i)
        self.spec = config.runtime_spec(
            weights=list(config.weights),
            parents=[p.config.family for p in parents],
            parameterization=self.parameterization,
            language=any(p.text_encoder is not None for p in parents),
        )

    # -- the contract's attributes ---------------------------------------------------------------------
    @property
    def path(self) -> GaussianPath:
        return self.parents[self.reference].path

    @property
    def parameterization(self) -> str:
        return self.config.space or self.parents[self.reference].parameterization

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        """The reference parent's options for ``sampler`` (eta, x0 clipping of the mix)."""
        return self.parents[self.reference].sampler_kwargs(sampler)

    # -- conditioning ----------------------------------------------------------------------------------
    @property
    def cond_width(self) -> int:
        """F: the packed condition width."""
        return sum(n * f for n, f in self._cond_shapes)

    def split_cond(self, cond: Tensor) -> list[Tensor]:
        """Packed cond (B, F) -> each parent's condition (B, Nc_i, Fc_i)."""
        if cond.dim() != 2 or cond.shape[1] != self.cond_width:
            raise VlaflowError(
                f"a composed policy's cond has shape (B, {self.cond_width}) (its parents' (Nc, Fc) "
                f"{self._cond_shapes} packed), got {tuple(cond.shape)}"
            )
        parts = torch.split(cond, [n * f for n, f in self._cond_shapes], dim=1)
        return [c.reshape(c.shape[0], n, f) for c, (n, f) in zip(parts, self._cond_shapes, strict=True)]

    def encode(self, obs: dict[str, Any]) -> Tensor:
        """Raw obs (B, To, ...) -> packed cond (B, F), each parent on its own keys and window."""
        out = []
        for p in self.parents:
            own = {k: v for k, v in obs.items() if k in p.config.obs_shapes or not k.startswith(K.OBS_PREFIX)}
            out.append(p.encode(own).flatten(1))  # (B, Nc_i * Fc_i)
        return torch.cat(out, dim=1)

    # -- denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Mixed prediction in ``parameterization`` for x_t (B, H, Da) at reference-path time t (B,)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return mix_predictions(
            list(self.parents),
            self.split_cond(cond),
            self.config.weights,
            self.reference,
            self.parameterization,
            x_t,
            t,
            self._clips,
        )

    # -- sampling --------------------------------------------------------------------------------------
    def denoise(
        self,
        cond: Tensor,
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        return_chain: bool = False,
        timesteps: Tensor | None = None,
    ) -> SampleResult:
        """The sampler on the reference path with the mixed prediction, in normalized action units."""
        cfg = self.config
        shape = (cond.shape[0], cfg.horizon, cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=cond.device)
        else:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=cond.device)
            if tuple(noise.shape) != shape:
                raise VlaflowError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            if generator is None:  # deterministic given noise, also for stochastic samplers
                generator = torch.Generator(device=cond.device).manual_seed(0)
        sampler = sampler or cfg.sampler
        return sample_loop(
            lambda x, t: self.predict(x, t, cond),
            self.path,
            noise,
            parameterization=self.parameterization,
            sampler=sampler,
            num_steps=num_steps or cfg.num_inference_steps,
            generator=generator,
            return_chain=return_chain,
            timesteps=timesteps,
            **self.sampler_kwargs(sampler),
        )

    def unnormalize_action(self, x: Tensor) -> Tensor:
        # The reference parent's statistics (they agree with the others' to 1e-5; this keeps w = 1 exact).
        return self.parents[self.reference].unnormalize_action(x)

    def generate(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        record_chain: bool = False,
    ) -> Generation:
        """Composite action chunks (B, H, Da) in raw units, their cost (NFE) and, optionally, the chain."""
        res = self.denoise(self.encode(obs), noise, sampler, num_steps, generator, return_chain=record_chain)
        return Generation(actions=self.unnormalize_action(res.x0), nfe=res.nfe, chain=res.steps)

    def compute_loss(self, batch):
        raise VlaflowError(
            "a GPC-composed policy is training-free: train the parents, then `vlaflow compose`"
        )


def _stats_of(policy) -> dict:
    return policy.normalizer.to_dict()["stats"]


def compose_policies(
    parents: list,
    weights,
    *,
    reference: int = -1,
    space: str = "",
    sampler: str = "",
    num_steps: int | None = None,
    parent_paths=(),
) -> ComposedPolicy:
    """A :class:`ComposedPolicy` from built/loaded parent policies (weights copied in)."""
    if len(parents) < 2:
        raise VlaflowError(f"GPC needs at least 2 parents, got {len(parents)}")
    c0 = parents[0].config
    stats: dict = {}
    modes: dict = {}
    obs_shapes: dict = {}
    for i, p in enumerate(parents):
        c = p.config
        if c.family not in PARENT_FAMILIES:
            raise VlaflowError(f"parent {i} is a {c.family!r} policy; GPC needs {PARENT_FAMILIES} parents")
        if (c.horizon, c.action_dim) != (c0.horizon, c0.action_dim) or c.fps != c0.fps:
            raise VlaflowError(
                f"parent {i} has (H, Da, fps) = {(c.horizon, c.action_dim, c.fps)}, parent 0 has "
                f"{(c0.horizon, c0.action_dim, c0.fps)}: GPC parents must share the action space"
            )
        for k, mode in p.normalizer.modes.items():
            if k in modes and modes[k] != mode:
                raise VlaflowError(f"parent {i} normalizes {k!r} by {mode!r}, an earlier one by {modes[k]!r}")
            modes[k] = mode
        for k, st in _stats_of(p).items():
            differ = k in stats and any(
                not np.allclose(stats[k][s], v, rtol=1e-5, atol=1e-6) for s, v in st.items()
            )
            if differ:
                raise VlaflowError(
                    f"parent {i}'s normalizer statistics for {k!r} differ from an earlier parent's: GPC "
                    "parents must share the action (and shared observation) normalization"
                )
            stats.setdefault(k, {s: np.asarray(v, dtype=np.float32) for s, v in st.items()})
        for k, shape in c.obs_shapes.items():
            if k in obs_shapes and tuple(obs_shapes[k]) != tuple(shape):
                raise VlaflowError(
                    f"parent {i} reads {k!r} as {tuple(shape)}, an earlier one as {obs_shapes[k]}"
                )
            obs_shapes[k] = tuple(shape)
    w = [float(x) for x in weights]
    cfg_ref = parents[default_reference(w) if reference < 0 else reference].config
    all_keys = {K.ACTION, *[k for k in obs_shapes if not K.is_image(k)]}
    cfg = ComposedConfig(
        n_obs_steps=max(p.config.n_obs_steps for p in parents),
        horizon=c0.horizon,
        n_action_steps=cfg_ref.n_action_steps,
        obs_shapes=obs_shapes,
        action_dim=c0.action_dim,
        fps=c0.fps,
        tasks=cfg_ref.tasks,
        normalization={k: modes.get(k, "identity") for k in all_keys},
        num_inference_steps=num_steps or cfg_ref.num_inference_steps,
        sampler=sampler,
        parent_configs=tuple(p.config.to_dict() for p in parents),
        parent_paths=tuple(str(x) for x in parent_paths),
        weights=tuple(w),
        reference=reference,
        space=space,
    )
    # Fresh parents built like the checkpoint loader builds them (the composite's own copies, normalized by
    # the shared statistics), so an in-memory composite and its saved-and-loaded twin sample identically.
    fresh = []
    for p in parents:
        q = type(p)(p.config, {k: stats[k] for k in p.config.norm_modes()})
        q.load_state_dict(p.state_dict())
        fresh.append(q)
    policy = ComposedPolicy(cfg, {k: stats[k] for k in cfg.norm_modes()}, fresh)
    return policy.to(parents[0].device).eval()
