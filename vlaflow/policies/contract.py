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
images arrive uint8 and are scaled by their encoder. :class:`DenoisingPolicy` is the
:class:`~vlaflow.policies.denoising.DenoisingModel` (the contract over any target key and shape) whose
target is the action chunk; a family (diffusion/, flow/, consistency/) combines it with its path recipe
(a family mixin or its own hooks: path, training-time distribution, regression target).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

import vlaflow.keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.policies.base_config import PolicyConfig
from vlaflow.policies.denoising import DenoisingModel, Generation, make_head
from vlaflow.policies.nets.encoders import ObsEncoder, cached_feature_key
from vlaflow.policies.path import GaussianPath

__all__ = [
    "DenoisingModel",
    "DenoisingPolicy",
    "DenoisingPolicyContract",
    "Generation",
    "batch_obs",
    "check_stats",
    "obs_window_tensors",
    "task_texts",
]


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


def obs_window_tensors(
    cfg: PolicyConfig, normalizer: Normalizer, device: torch.device, obs: dict[str, Any]
) -> dict[str, Tensor]:
    """Check keys/shapes (one error naming the shape got and the one expected), keep the last To steps,
    normalize low-dim keys; images stay uint8."""
    out = {}
    # a training batch may carry a frozen trunk's cached maps in place of the images
    cached = {k for k in cfg.obs_shapes if K.is_image(k) and k not in obs and cached_feature_key(k) in obs}
    for k in cached:
        out[cached_feature_key(k)] = torch.as_tensor(obs[cached_feature_key(k)], device=device)[
            :, -cfg.n_obs_steps :
        ]
    missing = [k for k in cfg.obs_shapes if k not in obs and k not in cached]
    if missing:
        raise VlaflowError(
            f"observation is missing key(s) {missing} the policy needs; it has {sorted(map(str, obs))}"
        )
    for k, shape in cfg.obs_shapes.items():
        if k in cached:
            continue
        x = torch.as_tensor(obs[k], device=device)
        if x.dim() != 2 + len(shape) or tuple(x.shape[2:]) != tuple(shape) or x.shape[1] < cfg.n_obs_steps:
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
            if k in normalizer.modes:
                x = normalizer.normalize(k, x)
        out[k] = x
    return out


def task_texts(cfg: PolicyConfig, default_task: str, obs: dict[str, Any], batch_size: int) -> list[str]:
    """Each row's instruction: ``obs["task"]``, else ``config.tasks[task_index]``, else ``default_task``."""
    if K.TASK in obs:
        task = obs[K.TASK]
        texts = [task] * batch_size if isinstance(task, str) else [str(s) for s in task]
    elif K.TASK_INDEX in obs:
        if not cfg.tasks:
            raise VlaflowError(
                "batch has task_index but config.tasks is empty; set tasks from WindowSampler.tasks"
            )
        idx = torch.as_tensor(obs[K.TASK_INDEX]).reshape(-1).tolist()
        n = len(cfg.tasks)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise VlaflowError(f"task_index values {bad[:5]} out of range for {n} tasks in config.tasks")
        texts = [cfg.tasks[i] for i in idx]
    elif default_task:
        texts = [default_task] * batch_size
    else:
        raise VlaflowError("a language-conditioned policy needs obs['task'] (str or list) or 'task_index'")
    if len(texts) != batch_size:
        raise VlaflowError(f"got {len(texts)} task strings for a batch of {batch_size}")
    return texts


class DenoisingPolicy(DenoisingModel):
    """A :class:`DenoisingModel` whose target is the action chunk (H, Da) and whose condition is the
    observation window (state / image encoders, optional language); families supply the path hooks."""

    def __init__(self, config: PolicyConfig, stats: dict):
        check_stats(config, stats)
        super().__init__(
            config,
            target_key=K.ACTION,
            target_shape=(config.horizon, config.action_dim),
            normalizer=Normalizer(stats, config.norm_modes()),
            mask_key=K.ACTION_IS_PAD if config.mask_pad_loss else None,
        )
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
        self.head = make_head(config.net, self.target_shape, cond_dim, n_tokens)
        # network rows before the current step (an imported LeRobot policy: To - 1), dropped after sampling
        self.action_offset = int(getattr(config, "action_offset", 0))
        self.spec = config.runtime_spec(
            horizon=config.horizon - self.action_offset,
            parameterization=self.parameterization,
            language=lang.enabled,
            **({"action_offset": self.action_offset} if self.action_offset else {}),
        )

    # -- observations ------------------------------------------------------------------------------
    def _obs_window(self, obs: dict[str, Any]) -> dict[str, Tensor]:
        """Check keys/shapes, keep the last To steps, normalize low-dim keys."""
        return obs_window_tensors(self.config, self.normalizer, self.device, obs)

    def _task_texts(self, obs: dict[str, Any], batch_size: int) -> list[str]:
        return task_texts(self.config, self.spec.task, obs, batch_size)

    def encode(self, obs: dict[str, Any]) -> Tensor:
        """Raw obs (B, To, ...) -> condition tokens (B, Nc, Fc)."""
        window = self._obs_window(obs)
        tokens = self.obs_encoder(window)  # (B, To, Fc)
        if self.text_encoder is not None:
            texts = self._task_texts(obs, tokens.shape[0])
            lang = self.lang_proj(self.text_encoder(texts, self.config.tasks))  # (B, Fc)
            tokens = torch.cat([tokens, lang.unsqueeze(1)], dim=1)
        return tokens

    def unnormalize_action(self, x: Tensor) -> Tensor:
        return self.normalizer.unnormalize(K.ACTION, x) if K.ACTION in self.normalizer.modes else x

    def generate(self, obs: dict[str, Any], *args, **kwargs) -> Generation:
        """As :meth:`DenoisingModel.generate`; the chunk starts at the current step (``action_offset`` rows
        of the network's chunk that lie in the past are dropped; the recorded chain keeps them)."""
        gen = super().generate(obs, *args, **kwargs)
        if self.action_offset:
            gen.actions = gen.actions[:, self.action_offset :]  # (B, H - offset, Da)
        return gen

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if self.action_offset:
            raise VlaflowError(
                f"this policy's network chunk starts {self.action_offset} step(s) before the current one "
                "(an imported LeRobot policy, action_offset > 0); vlaflow's training windows start it at "
                "the current step, so training or fine-tuning it is not supported"
            )
        return super().compute_loss(batch)


def batch_obs(batch: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The observation part of a training batch (obs keys plus task fields)."""
    return {k: batch[k] for k in (*keys, K.TASK, K.TASK_INDEX) if k in batch}
