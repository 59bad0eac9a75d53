"""The contract the denoising families share, and its one implementation over a Gaussian path.

Shapes: B batch, To observation steps, H action chunk length, Da action dim, Nc condition tokens
(To per-step tokens, plus one language token when instructions condition the policy), Fc token width.
Timing (obs window t-To+1..t, chunk[0] = action at t, execute chunk[0:Ta]) is drawn once in
:mod:`vlaflow.interfaces`; training windows (:mod:`vlaflow.data.windows`) use the same alignment.

Every denoising policy has:

- ``encode(obs) -> cond`` (B, Nc, Fc): observation encoders, run once per control step
- ``predict(x_t, t, cond) -> (B, H, Da)`` in the family's native ``parameterization`` (eps / velocity)
- ``path``: the Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps`` (VP cosine or rectified flow)
- ``compute_loss(batch) -> (loss, metrics)`` on a raw-unit batch from ``WindowSampler``
- ``sample(obs, noise=None, sampler=None, num_steps=None) -> (B, H, Da)`` in raw action units,
  deterministic given ``noise`` (stochastic samplers then draw from a generator seeded with 0)

Actions and low-dim observations are normalized inside (``self.normalizer``, saved as normalizer.json);
images arrive uint8 and are scaled by their encoder. A family (diffusion/, flow/) subclasses
:class:`DenoisingPolicy` once, supplying its path, training-time distribution and regression target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlaflow import keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.policies.base_config import PolicyConfig
from vlaflow.policies.nets.encoders import ObsEncoder
from vlaflow.policies.nets.mlp import MLPHead
from vlaflow.policies.nets.transformer import TransformerHead
from vlaflow.policies.nets.unet1d import ConditionalUnet1D
from vlaflow.policies.path import GaussianPath
from vlaflow.policies.samplers import SampleResult, sample_loop


@dataclass
class Generation:
    """What one sampling call of any family produced (``generate``; ``sample`` returns ``.actions``)."""

    actions: Tensor  # (B, H, Da) raw action units
    nfe: int  # network evaluations (EBT: descent steps, each a forward and a backward pass)
    chain: list = field(default_factory=list)  # the sampler's StepResults when record_chain=True
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific, e.g. EBT's final "energy" (B,)


@runtime_checkable
class DenoisingPolicyContract(Protocol):
    """What GPC, RTI-DP, RTC, ONNX export and RL code may rely on."""

    config: PolicyConfig
    normalizer: Normalizer
    spec: RuntimeSpec
    path: GaussianPath
    parameterization: str

    def encode(self, obs: dict[str, Any]) -> Tensor: ...

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor: ...

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]: ...

    def sample(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
    ) -> Tensor: ...


def check_stats(config: PolicyConfig, stats: dict) -> None:
    """Every key the config normalizes needs statistics of the right shape; name what stats has."""
    modes = config.norm_modes()
    missing = [k for k in modes if k not in stats]
    if missing:
        raise ConfigError(
            f"normalizer statistics are missing key(s) {missing} that the policy config uses; "
            f"the statistics have keys {sorted(stats)}"
        )
    shapes = {K.ACTION: (config.action_dim,), **config.obs_shapes}
    for k in modes:
        for stat_name, v in stats[k].items():
            got = tuple(np.shape(v))
            if got != tuple(shapes[k]):
                raise ConfigError(
                    f"normalizer statistic {k!r}/{stat_name} has shape {got}, the policy config expects "
                    f"{tuple(shapes[k])} (obs_shapes / action_dim)"
                )


class DenoisingPolicy(nn.Module):
    """Encoders + action head + Gaussian path + normalizer; families override the four hooks below."""

    parameterization: str = ""  # native prediction: "eps" | "velocity" | "x0"

    # -- family hooks ------------------------------------------------------------------------------
    def make_path(self) -> GaussianPath:
        raise NotImplementedError

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        raise NotImplementedError

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        return {}

    # -- construction ------------------------------------------------------------------------------
    def __init__(self, config: PolicyConfig, stats: dict):
        super().__init__()
        check_stats(config, stats)
        self.config = config
        self.normalizer = Normalizer(stats, config.norm_modes())
        self.obs_encoder = ObsEncoder(config.obs_shapes, config.encoder)
        cond_dim = self.obs_encoder.out_dim
        n_tokens = config.n_obs_steps
        lang = config.encoder.language
        self.text_encoder = None
        if lang.enabled:
            from vlaflow.policies.nets.language import TextEncoder

            self.text_encoder = TextEncoder(lang)
            self.lang_proj = nn.Linear(self.text_encoder.out_dim, cond_dim)
            n_tokens += 1
        self.n_cond_tokens, self.cond_dim = n_tokens, cond_dim
        if config.net.kind == "unet":
            u = config.net.unet
            self.head = ConditionalUnet1D(
                config.action_dim,
                cond_dim * n_tokens,
                u.down_dims,
                u.kernel_size,
                u.n_groups,
                u.step_embed_dim,
            )
        elif config.net.kind == "mlp":
            m = config.net.mlp
            self.head = MLPHead(
                config.action_dim,
                config.horizon,
                cond_dim * n_tokens,
                m.width,
                m.n_blocks,
                m.step_embed_dim,
            )
        else:
            tc = config.net.transformer
            self.head = TransformerHead(
                config.action_dim,
                config.horizon,
                cond_dim,
                n_tokens,
                tc.d_model,
                tc.n_layers,
                tc.n_heads,
                tc.mlp_ratio,
                tc.dropout,
                tc.causal,
            )
        self.path = self.make_path()
        self.spec = RuntimeSpec(
            n_obs_steps=config.n_obs_steps,
            horizon=config.horizon,
            n_action_steps=config.n_action_steps,
            obs_shapes={k: tuple(v) for k, v in config.obs_shapes.items()},
            action_dim=config.action_dim,
            fps=config.fps,
            task=config.tasks[0] if config.tasks else "",
            extra={
                "family": config.family,
                "sampler": config.sampler,
                "num_inference_steps": config.num_inference_steps,
                "parameterization": self.parameterization,
                "language": lang.enabled,
            },
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- observations ------------------------------------------------------------------------------
    def _obs_window(self, obs: dict[str, Any]) -> dict[str, Tensor]:
        """Check keys/shapes, keep the last To steps, normalize low-dim keys."""
        cfg, out = self.config, {}
        missing = [k for k in cfg.obs_shapes if k not in obs]
        if missing:
            raise VlaflowError(
                f"observation is missing key(s) {missing} the policy needs; it has {sorted(map(str, obs))}"
            )
        for k, shape in cfg.obs_shapes.items():
            x = torch.as_tensor(obs[k], device=self.device)
            if (
                x.dim() != 2 + len(shape)
                or tuple(x.shape[2:]) != tuple(shape)
                or x.shape[1] < cfg.n_obs_steps
            ):
                raise VlaflowError(
                    f"observation {k!r} has shape {tuple(x.shape)}, expected (B, To>={cfg.n_obs_steps}, "
                    f"{', '.join(map(str, shape))})"
                )
            x = x[:, -cfg.n_obs_steps :]
            if K.is_image(k):
                if x.dtype != torch.uint8:
                    raise VlaflowError(f"image {k!r} must be uint8 (0..255), got {x.dtype}")
            else:
                x = x.float()
                if k in self.normalizer.modes:
                    x = self.normalizer.normalize(k, x)
            out[k] = x
        return out

    def _task_texts(self, obs: dict[str, Any], batch_size: int) -> list[str]:
        if K.TASK in obs:
            task = obs[K.TASK]
            texts = [task] * batch_size if isinstance(task, str) else [str(s) for s in task]
        elif K.TASK_INDEX in obs:
            if not self.config.tasks:
                raise VlaflowError(
                    "batch has task_index but config.tasks is empty; set tasks from WindowSampler.tasks"
                )
            idx = torch.as_tensor(obs[K.TASK_INDEX]).reshape(-1).tolist()
            n = len(self.config.tasks)
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise VlaflowError(f"task_index values {bad[:5]} out of range for {n} tasks in config.tasks")
            texts = [self.config.tasks[i] for i in idx]
        elif self.spec.task:
            texts = [self.spec.task] * batch_size
        else:
            raise VlaflowError(
                "a language-conditioned policy needs obs['task'] (str or list) or 'task_index'"
            )
        if len(texts) != batch_size:
            raise VlaflowError(f"got {len(texts)} task strings for a batch of {batch_size}")
        return texts

    def encode(self, obs: dict[str, Any]) -> Tensor:
        """Raw obs (B, To, ...) -> condition tokens (B, Nc, Fc)."""
        window = self._obs_window(obs)
        tokens = self.obs_encoder(window)  # (B, To, Fc)
        if self.text_encoder is not None:
            texts = self._task_texts(obs, tokens.shape[0])
            lang = self.lang_proj(self.text_encoder(texts))  # (B, Fc)
            tokens = torch.cat([tokens, lang.unsqueeze(1)], dim=1)
        return tokens

    # -- denoiser ----------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Native prediction for x_t (B, H, Da) at path time t (B,) given cond (B, Nc, Fc)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        tm = self.path.model_time(t)
        if self.config.net.kind in ("unet", "mlp"):
            return self.head(x_t, tm, cond.flatten(1))
        return self.head(x_t, tm, cond)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """= compute_loss, so DistributedDataParallel(policy)(batch) synchronizes gradients."""
        return self.compute_loss(batch)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Masked MSE of the native prediction on a raw-unit batch; metrics are python floats."""
        cfg = self.config
        action = torch.as_tensor(batch[K.ACTION], device=self.device).float()
        if action.dim() != 3 or action.shape[1] != cfg.horizon or action.shape[2] != cfg.action_dim:
            raise VlaflowError(
                f"batch 'action' has shape {tuple(action.shape)}, "
                f"expected (B, {cfg.horizon}, {cfg.action_dim})"
            )
        x0 = self.normalizer.normalize(K.ACTION, action) if K.ACTION in self.normalizer.modes else action
        cond = self.encode(batch)
        b = x0.shape[0]
        t = self.sample_train_time(b, x0.device)
        eps = torch.randn_like(x0)
        a = self.path.alpha(t).to(x0.device).view(b, 1, 1)
        s = self.path.sigma(t).to(x0.device).view(b, 1, 1)
        x_t = a * x0 + s * eps
        pred = self.predict(x_t, t, cond)
        err = F.mse_loss(pred, self.regression_target(x0, eps, t), reduction="none")  # (B, H, Da)
        if cfg.mask_pad_loss and K.ACTION_IS_PAD in batch:
            keep = (~torch.as_tensor(batch[K.ACTION_IS_PAD], device=err.device).bool()).unsqueeze(-1).float()
            loss = (err * keep).sum() / (keep.sum() * err.shape[-1]).clamp(min=1.0)
        else:
            loss = err.mean()
        return loss, {"loss": float(loss.detach()), "mse_all": float(err.detach().mean())}

    # -- sampling ----------------------------------------------------------------------------------
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
        """Run the sampler in normalized action space from ``noise`` (B, H, Da); for RL/RTI/GPC."""
        cfg = self.config
        b = cond.shape[0]
        shape = (b, cfg.horizon, cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=cond.device)
        else:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=cond.device)
            if tuple(noise.shape) != shape:
                raise VlaflowError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            if generator is None:  # deterministic given noise, also for stochastic samplers
                generator = torch.Generator(device=cond.device).manual_seed(0)
        sampler = sampler or cfg.sampler
        steps = num_steps or cfg.num_inference_steps
        return sample_loop(
            lambda x, t: self.predict(x, t, cond),
            self.path,
            noise,
            parameterization=self.parameterization,
            sampler=sampler,
            num_steps=steps,
            generator=generator,
            return_chain=return_chain,
            timesteps=timesteps,
            **self.sampler_kwargs(sampler),
        )

    def unnormalize_action(self, x: Tensor) -> Tensor:
        return self.normalizer.unnormalize(K.ACTION, x) if K.ACTION in self.normalizer.modes else x

    def generate(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        record_chain: bool = False,
    ) -> Generation:
        """Action chunks (B, H, Da) in raw units with their cost (NFE) and, optionally, the chain."""
        cond = self.encode(obs)
        res = self.denoise(
            cond,
            noise=noise,
            sampler=sampler,
            num_steps=num_steps,
            generator=generator,
            return_chain=record_chain,
        )
        return Generation(actions=self.unnormalize_action(res.x0), nfe=res.nfe, chain=res.steps)

    def sample(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Action chunks (B, H, Da) in raw action units."""
        return self.generate(obs, noise, sampler, num_steps, generator).actions

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def batch_obs(batch: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The observation part of a training batch (obs keys plus task fields)."""
    return {k: batch[k] for k in (*keys, K.TASK, K.TASK_INDEX) if k in batch}
