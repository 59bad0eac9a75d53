"""VLM-prefix policy (pi0 / SmolVLA): prefix KV cache once per control step, action expert per denoising step.

Shapes: B batch, To observation steps, H action chunk length, Da action dim, P prefix tokens.

On the denoising contract:

- ``encode(obs) -> cond`` (B, P, Fc): image + instruction (+ state) tokens through the backbone with a
  bidirectional prefix mask; ``cond`` is the per-layer key/value cache plus a validity column
  (:mod:`vlaflow.policies.vla.backbone` documents the packing).
- ``predict(x_t, t, cond) -> (B, H, Da)``: the action expert (:mod:`vlaflow.policies.vla.expert`) on the
  noisy chunk, attending to the cache; the prefix is never recomputed inside a chunk's sampling loop.
- ``objective="flow"`` (default, pi0): rectified flow with pi0's Beta time sampling, velocity target, Euler;
  ``objective="diffusion"``: the VP cosine path with eps prediction (DDIM / DDPM), the same hooks as the
  diffusion family.

bf16 autocast covers encode and predict on CUDA only; the sampler arithmetic and the returned tensors are
float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

import vlaflow.keys as K
from vlaflow.data.normalize import Normalizer
from vlaflow.policies.contract import check_stats, obs_window_tensors, task_texts
from vlaflow.policies.denoising import DenoisingModel
from vlaflow.policies.diffusion.model import DiffusionFamily
from vlaflow.policies.flow.model import FlowFamily
from vlaflow.policies.vla.backbone import PrefixBackbone, expert_width
from vlaflow.policies.vla.config import VLAConfig
from vlaflow.policies.vla.expert import ActionExpert


class VLAPolicy(DenoisingModel):
    config_class = VLAConfig
    config: VLAConfig

    def __init__(self, config: VLAConfig, stats: dict):
        check_stats(config, stats)
        self._recipe = FlowFamily if config.objective == "flow" else DiffusionFamily
        super().__init__(
            config,
            target_key=K.ACTION,
            target_shape=(config.horizon, config.action_dim),
            normalizer=Normalizer(stats, config.norm_modes()),
            mask_key=K.ACTION_IS_PAD if config.mask_pad_loss else None,
        )
        self.parameterization = self._recipe.parameterization
        self.text_encoder = None  # the backbone reads the instruction itself (no separate text encoder)
        self.image_keys = [k for k in config.obs_shapes if K.is_image(k)]
        self.lowdim_keys = [k for k in config.obs_shapes if not K.is_image(k)]
        state_dim = sum(math.prod(config.obs_shapes[k]) for k in self.lowdim_keys)
        self.backbone = PrefixBackbone(config, {k: config.obs_shapes[k] for k in self.image_keys}, state_dim)
        bb = self.backbone
        self.expert = ActionExpert(
            config.action_dim,
            config.horizon,
            bb.n_layers,
            bb.n_heads,
            bb.n_kv,
            bb.head_dim,
            expert_width(config, bb.width),
            config.expert_mlp_ratio,
        )
        self.spec = config.runtime_spec(
            parameterization=self.parameterization, language=True, backbone=config.backbone
        )

    # -- family hooks: the flow or the diffusion recipe ----------------------------------------------
    def make_path(self):
        return self._recipe.make_path(self)

    def sample_train_time(self, batch_size: int, device) -> Tensor:
        return self._recipe.sample_train_time(self, batch_size, device)

    def regression_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self._recipe.regression_target(self, x0, eps, t)

    def sampler_kwargs(self, sampler: str) -> dict[str, Any]:
        return self._recipe.sampler_kwargs(self, sampler)

    # -- contract ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prefix(self, obs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Checked observation -> prefix embeddings (B, P, d) and validity (B, P)."""
        window = obs_window_tensors(self.config, self.normalizer, self.device, obs)
        b = window[next(iter(self.config.obs_shapes))].shape[0]
        ids, mask = self.backbone.tokenize(task_texts(self.config, self.spec.task, obs, b), self.device)
        return self.prefix_from_window(window, ids, mask)

    def prefix_from_window(
        self, window: dict[str, Tensor], ids: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """A checked window (low-dim normalized, images uint8) + instruction token ids / mask (B, T) ->
        prefix embeddings and validity (the exported prefix graph starts here)."""
        images = [window[k] for k in self.image_keys]
        state = None
        if self.lowdim_keys:
            b, to = window[self.lowdim_keys[0]].shape[:2]
            state = torch.cat([window[k].reshape(b, to, -1) for k in self.lowdim_keys], dim=-1)
        return self.backbone.embed_prefix(images, state, ids, mask)

    def encode(self, obs: dict[str, Any]) -> Tensor:
        """Raw obs (B, To, ...) + instruction -> the prefix KV cache (B, P, L * 2 * Hkv * Dh + 1)."""
        with self._autocast():
            emb, valid = self.prefix(obs)
            return self.backbone.prefix_kv(emb, valid).float()

    def encode_window(self, window: dict[str, Tensor], ids: Tensor, mask: Tensor) -> Tensor:
        """:meth:`encode` from a checked window and token ids (what the exported prefix graph computes)."""
        with self._autocast():
            return self.backbone.prefix_kv(*self.prefix_from_window(window, ids, mask)).float()

    def instruction_tokens(self) -> dict[str, tuple[list[int], list[int]]]:
        """Token ids and mask of every instruction the policy knows (config.tasks and its default task):
        an ONNX export carries them, so a robot needs no tokenizer."""
        texts = list(dict.fromkeys([*self.config.tasks, *([self.spec.task] if self.spec.task else [])]))
        if not texts:
            return {}
        ids, mask = self.backbone.tokenize(texts, "cpu")
        return {t: (ids[i].tolist(), mask[i].long().tolist()) for i, t in enumerate(texts)}

    def split_cond(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """cond -> (kv (B, P, L, 2, Hkv, Dh), valid (B, P) bool)."""
        bb = self.backbone
        b, p, _ = cond.shape
        kv = cond[..., :-1].reshape(b, p, bb.n_layers, 2, bb.n_kv, bb.head_dim)
        return kv, cond[..., -1] > 0.5

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Native prediction (velocity or eps) (B, H, Da) for x_t at path time t, from the cached prefix."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        kv, valid = self.split_cond(cond)
        with self._autocast():
            out = self.expert(x_t, self.path.model_time(t), kv, valid, self.backbone.rotary)
        return out.float()

    def predict_uncached(self, x_t: Tensor, t: Tensor, obs: dict[str, Any]) -> Tensor:
        """The same prediction with the prefix recomputed (what a policy without the cache pays per step)."""
        return self.predict(x_t, t, self.encode(obs))

    def save_backbone_files(self, directory) -> None:
        """The checkpoint's ``backbone/``: tokenizer, architecture and vocabulary fingerprint."""
        self.backbone.save_files(directory)
