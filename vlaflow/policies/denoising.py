"""The denoising contract over any target: a model that learns ``p(target | cond)`` on a Gaussian path.

Shapes: B batch, S the target's per-sample shape (L, D): a policy's action chunk (H, Da), a world model's
future observations (Tf, Do), a test's (4, 3) next state; Nc condition tokens of width Fc.

A :class:`DenoisingModel` is a normalizer, a condition encoder (``encode(obs) -> cond`` (B, Nc, Fc)), a
head predicting on ``x_t`` (B, *S), a Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps`` and its samplers,
and ``compute_loss`` on the batch's ``target_key``. :class:`vlaflow.policies.contract.DenoisingPolicy` is
the case whose target is the action chunk and whose condition is the observation window; a diffusion world
model (target = future observations, cond = observation window + actions) is another, reusing the paths,
samplers, heads and export instead of forking them.

What a concrete model supplies:

- family hooks: ``parameterization`` and ``make_path`` / ``sample_train_time`` / ``regression_target`` /
  ``sampler_kwargs`` (the diffusion and flow recipes are mixins usable on any target:
  :class:`vlaflow.policies.diffusion.model.DiffusionFamily`, :class:`vlaflow.policies.flow.model.FlowFamily`)
- ``encode(obs) -> cond``
- ``self.head``: ``forward(x_t (B, *S), model_time (B,), cond)`` with a class attribute ``flat_cond``
  (True: it reads cond flattened to (B, Nc * Fc); False: the tokens); :func:`make_head` builds the shared
  ones from a :class:`~vlaflow.policies.base_config.NetConfig`
- ``config`` with ``sampler`` (default sampler name) and ``num_inference_steps``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlaflow.data.normalize import Normalizer
from vlaflow.errors import VlaflowError
from vlaflow.policies.base_config import NetConfig
from vlaflow.policies.nets.mlp import MLPHead
from vlaflow.policies.nets.transformer import TransformerHead
from vlaflow.policies.nets.unet1d import ConditionalUnet1D
from vlaflow.policies.path import GaussianPath
from vlaflow.policies.samplers import SampleResult, sample_loop


@dataclass
class Generation:
    """What one sampling call of any family produced (``generate``; ``sample`` returns ``.actions``)."""

    actions: Tensor  # (B, *S) raw units: the action chunk (B, H, Da) for a policy, else the target
    nfe: int  # network evaluations (EBT: descent steps, each a forward and a backward pass)
    chain: list = field(default_factory=list)  # the sampler's StepResults when record_chain=True
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific, e.g. EBT's final "energy" (B,)


def make_head(net: NetConfig, target_shape: tuple[int, ...], cond_dim: int, n_tokens: int) -> nn.Module:
    """The configured shared head over a (L, D) target with ``n_tokens`` condition tokens of ``cond_dim``."""
    if len(target_shape) != 2:
        raise VlaflowError(
            f"the shared heads denoise (L, D) targets; got target shape {tuple(target_shape)} "
            "(bring a head of your own for other shapes)"
        )
    length, dim = target_shape
    if net.kind == "unet":
        u = net.unet
        return ConditionalUnet1D(
            dim, cond_dim * n_tokens, u.down_dims, u.kernel_size, u.n_groups, u.step_embed_dim
        )
    if net.kind == "mlp":
        m = net.mlp
        return MLPHead(dim, length, cond_dim * n_tokens, m.width, m.n_blocks, m.step_embed_dim)
    tc = net.transformer
    return TransformerHead(
        dim,
        length,
        cond_dim,
        n_tokens,
        tc.d_model,
        tc.n_layers,
        tc.n_heads,
        tc.mlp_ratio,
        tc.dropout,
        tc.causal,
    )


class GenerativeModule(nn.Module):
    """What every sampled model shares: ``sample`` is ``generate(...).actions``; its device; its size.

    A subclass defines ``generate(obs, noise, sampler, num_steps, generator, record_chain=False)``.
    """

    def generate(self, obs: dict[str, Any], noise=None, sampler=None, num_steps=None, generator=None,
                 record_chain: bool = False) -> Generation:  # fmt: skip
        raise NotImplementedError

    def sample(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples (B, *S) in raw units (a policy: action chunks (B, H, Da)); deterministic given noise."""
        return self.generate(obs, noise, sampler, num_steps, generator).actions

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class DenoisingModel(GenerativeModule):
    """Normalizer + condition encoder + head + Gaussian path over one target key; see the module doc."""

    parameterization: str = ""  # native prediction: "eps" | "velocity" | "x0"
    head: nn.Module

    # -- family hooks ------------------------------------------------------------------------------
    def make_path(self) -> GaussianPath:
        raise NotImplementedError

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        raise NotImplementedError

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        return {}

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weight (B,) of the regression error at training time ``t``; None: unweighted (the
        policies). EDM's ``1 / c_out^2`` (the world model's) makes the loss that of the preconditioned net."""
        return None

    def default_timesteps(self, num_steps: int) -> Tensor:
        """The sampler's time grid, noisy to clean (a one-step student starts at its teacher's time)."""
        return self.path.timesteps(num_steps)

    # -- condition hook ----------------------------------------------------------------------------
    def encode(self, obs: dict[str, Any]) -> Tensor:
        """Raw inputs -> condition (B, Nc, Fc)."""
        raise NotImplementedError

    # -- construction ------------------------------------------------------------------------------
    def __init__(
        self,
        config,
        *,
        target_key: str,
        target_shape: tuple[int, ...],
        normalizer: Normalizer,
        mask_key: str | None = None,
    ):
        """``mask_key``: a (B, L) bool batch entry marking padded target rows left out of the loss."""
        super().__init__()
        self.config = config
        self.target_key = target_key
        self.target_shape = tuple(int(s) for s in target_shape)
        self.normalizer = normalizer
        self.mask_key = mask_key
        self.path = self.make_path()

    def normalize_target(self, x: Tensor) -> Tensor:
        return (
            self.normalizer.normalize(self.target_key, x) if self.target_key in self.normalizer.modes else x
        )

    def unnormalize_target(self, x: Tensor) -> Tensor:
        key = self.target_key
        return self.normalizer.unnormalize(key, x) if key in self.normalizer.modes else x

    # -- denoiser ----------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Native prediction for x_t (B, *S) at path time t (B,) given cond (B, Nc, Fc)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        tm = self.path.model_time(t)
        return self.head(x_t, tm, cond.flatten(1) if self.head.flat_cond else cond)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """= compute_loss, so DistributedDataParallel(model)(batch) synchronizes gradients."""
        return self.compute_loss(batch)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Masked MSE of the native prediction on a raw-unit batch; metrics are python floats."""
        key, shape = self.target_key, self.target_shape
        if key not in batch:
            raise VlaflowError(f"batch has no {key!r} (the model's target); it has {sorted(map(str, batch))}")
        target = torch.as_tensor(batch[key], device=self.device).float()
        if target.dim() != 1 + len(shape) or tuple(target.shape[1:]) != shape:
            raise VlaflowError(
                f"batch {key!r} has shape {tuple(target.shape)}, expected (B, {', '.join(map(str, shape))})"
            )
        x0 = self.normalize_target(target)
        cond = self.encode(batch)
        b = x0.shape[0]
        t = self.sample_train_time(b, x0.device)
        eps = torch.randn_like(x0)
        view = (b, *([1] * len(shape)))
        a = self.path.alpha(t).to(x0.device).view(view)
        s = self.path.sigma(t).to(x0.device).view(view)
        x_t = a * x0 + s * eps
        pred = self.predict(x_t, t, cond)
        err = F.mse_loss(pred, self.regression_target(x0, eps, t), reduction="none")  # (B, *S)
        w = self.loss_weight(t)
        if w is not None:
            err = err * w.to(err.device).view(view)
        if self.mask_key is not None and self.mask_key in batch:
            keep = (~torch.as_tensor(batch[self.mask_key], device=err.device).bool()).unsqueeze(-1).float()
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
        sampler_options: dict[str, Any] | None = None,
    ) -> SampleResult:
        """Run the sampler in normalized target space from ``noise`` (B, *S); for RL/RTI/GPC.

        ``sampler_options`` override the family's settings (``sampler_kwargs``) of this call, e.g.
        ``{"eta": 1.0, "min_std": 0.1}`` (stochastic DDIM with a std floor) or ``{"noise_std": 0.1}``
        (ReinFlow noise on Euler): the knobs RL over the denoising chain samples with.
        """
        shape = (cond.shape[0], *self.target_shape)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=cond.device)
        else:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=cond.device)
            if tuple(noise.shape) != shape:
                raise VlaflowError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            if generator is None:  # deterministic given noise, also for stochastic samplers
                generator = torch.Generator(device=cond.device).manual_seed(0)
        sampler = sampler or self.config.sampler
        steps = num_steps or self.config.num_inference_steps
        return sample_loop(
            lambda x, t: self.predict(x, t, cond),
            self.path,
            noise,
            parameterization=self.parameterization,
            sampler=sampler,
            num_steps=steps,
            generator=generator,
            return_chain=return_chain,
            timesteps=self.default_timesteps(steps) if timesteps is None else timesteps,
            **{**self.sampler_kwargs(sampler), **(sampler_options or {})},
        )

    def generate(
        self,
        obs: dict[str, Any],
        noise: Tensor | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        record_chain: bool = False,
        sampler_options: dict[str, Any] | None = None,
    ) -> Generation:
        """Samples (B, *S) in raw units with their cost (NFE) and, optionally, the chain."""
        cond = self.encode(obs)
        res = self.denoise(
            cond,
            noise=noise,
            sampler=sampler,
            num_steps=num_steps,
            generator=generator,
            return_chain=record_chain,
            **({"sampler_options": sampler_options} if sampler_options else {}),
        )
        return Generation(actions=self.unnormalize_target(res.x0), nfe=res.nfe, chain=res.steps)
