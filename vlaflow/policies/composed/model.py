"""A GPC-composed policy behind the ordinary policy contract (``sample``, checkpoints, ``vlaflow eval``).

Shapes: B batch, To observation steps (the longest parent window), H chunk length, Da action dim.
The parents are sub-modules, so a composed checkpoint is self-contained: config.json embeds every parent's
config, model.safetensors holds ``parents.<i>.*`` weights, normalizer.json the union of their statistics
(which must agree key by key). Sampling is :func:`vlaflow.policies.compose.gpc_sample`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlaflow import keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.policies.compose import default_reference, gpc_sample
from vlaflow.policies.composed.config import ComposedConfig
from vlaflow.policies.contract import Generation, check_stats

DENOISING_FAMILIES = ("diffusion", "flow")


class ComposedPolicy(nn.Module):
    config_class = ComposedConfig
    config: ComposedConfig

    def __init__(self, config: ComposedConfig, stats: dict):
        super().__init__()
        from vlaflow.policies.registry import build_policy, policy_config_from_dict

        check_stats(config, stats)
        self.config = config
        self.normalizer = Normalizer(stats, config.norm_modes())
        parents = []
        for i, d in enumerate(config.parent_configs):
            pcfg = policy_config_from_dict(dict(d))
            if pcfg.family not in DENOISING_FAMILIES:
                raise VlaflowError(
                    f"GPC parent {i} is a {pcfg.family!r} policy; composition needs denoising parents "
                    f"({', '.join(DENOISING_FAMILIES)})"
                )
            parents.append(build_policy(pcfg, {k: stats[k] for k in pcfg.norm_modes()}))
        self.parents = nn.ModuleList(parents)
        w = list(config.weights)
        self.reference = default_reference(w) if config.reference < 0 else config.reference
        ref = self.parents[self.reference]
        self.spec = RuntimeSpec(
            n_obs_steps=config.n_obs_steps,
            horizon=config.horizon,
            n_action_steps=config.n_action_steps,
            obs_shapes={k: tuple(v) for k, v in config.obs_shapes.items()},
            action_dim=config.action_dim,
            fps=config.fps,
            task=config.tasks[0] if config.tasks else "",
            extra={
                "family": "composed",
                "weights": w,
                "parents": [p.config.family for p in self.parents],
                "sampler": config.sampler or ref.config.sampler,
                "num_inference_steps": config.num_inference_steps,
            },
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, obs: dict[str, Any]) -> list[Tensor]:
        """Each parent's own condition tokens from its own observation keys and window."""
        out = []
        for p in self.parents:
            own = {k: v for k, v in obs.items() if k in p.config.obs_shapes or not k.startswith("obs.")}
            out.append(p.encode(own))
        return out

    def denoise(self, conds, noise=None, sampler=None, num_steps=None, generator=None, return_chain=False):
        cfg = self.config
        b = conds[0].shape[0]
        shape = (b, cfg.horizon, cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=conds[0].device)
        noise = torch.as_tensor(noise, dtype=torch.float32, device=conds[0].device)
        if tuple(noise.shape) != shape:
            raise VlaflowError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return gpc_sample(
            list(self.parents),
            conds,
            cfg.weights,
            noise,
            reference=self.reference,
            space=cfg.space or None,
            sampler=sampler or cfg.sampler or None,
            num_steps=num_steps or cfg.num_inference_steps,
            generator=generator,
            return_chain=return_chain,
        )

    def generate(self, obs, noise=None, sampler=None, num_steps=None, generator=None, record_chain=False):
        res = self.denoise(self.encode(obs), noise, sampler, num_steps, generator, return_chain=record_chain)
        actions = self.parents[self.reference].unnormalize_action(res.x0)
        return Generation(actions=actions, nfe=res.nfe, chain=res.steps)

    def sample(self, obs, noise=None, sampler=None, num_steps=None, generator=None) -> Tensor:
        """Composite action chunks (B, H, Da) in raw units; deterministic given ``noise``."""
        return self.generate(obs, noise, sampler, num_steps, generator).actions

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
        if c.family not in DENOISING_FAMILIES:
            raise VlaflowError(f"parent {i} is a {c.family!r} policy; GPC needs {DENOISING_FAMILIES} parents")
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
    ref = default_reference(w) if reference < 0 else reference
    rc = parents[ref].config
    all_keys = {K.ACTION, *[k for k in obs_shapes if not K.is_image(k)]}
    cfg = ComposedConfig(
        n_obs_steps=max(p.config.n_obs_steps for p in parents),
        horizon=c0.horizon,
        n_action_steps=rc.n_action_steps,
        obs_shapes=obs_shapes,
        action_dim=c0.action_dim,
        fps=c0.fps,
        tasks=rc.tasks,
        normalization={k: modes.get(k, "identity") for k in all_keys},
        num_inference_steps=num_steps or rc.num_inference_steps,
        sampler=sampler,
        parent_configs=tuple(p.config.to_dict() for p in parents),
        parent_paths=tuple(str(x) for x in parent_paths),
        weights=tuple(w),
        reference=reference,
        space=space,
    )
    policy = ComposedPolicy(cfg, {k: stats[k] for k in cfg.norm_modes()})
    for dst, src in zip(policy.parents, parents, strict=True):
        dst.load_state_dict(src.state_dict())
    return policy.to(parents[0].device).eval()


def load_parents(paths, device: str = "cpu") -> list:
    from vlaflow.policies.checkpoint import load_checkpoint

    out = []
    for p in paths:
        if not (Path(p) / "config.json").is_file():
            raise VlaflowError(f"{p}: not a policy checkpoint directory (no config.json)")
        fam = json.loads((Path(p) / "config.json").read_text()).get("config", {}).get("family")
        if fam not in DENOISING_FAMILIES:
            raise VlaflowError(f"{p}: a {fam!r} checkpoint; GPC parents must be {DENOISING_FAMILIES}")
        out.append(load_checkpoint(p, device=device))
    return out
