"""Config of a steered policy: the frozen base policy's config (embedded) + the noise actor's sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlaflow.policies.base_config import PolicyConfig, _check

BASE_FAMILIES = ("diffusion", "flow", "consistency")  # denoising families DSRL steers


@dataclass(frozen=True)
class SteeredConfig(PolicyConfig):
    family: str = "steered"  # registry name (fixed)
    base_config: dict[str, Any] | None = None  # the frozen policy's config.to_dict() (weights: base.*)
    width: int = 256  # actor MLP width
    bound: float = 1.5  # |w| <= bound per noise dim

    def __post_init__(self):
        _check(self.family == "steered", f"SteeredConfig.family must be 'steered', got {self.family!r}")
        super().__post_init__()
        fam = (self.base_config or {}).get("family")
        _check(
            fam in BASE_FAMILIES, f"base_config is a {fam!r} policy; steering needs one of {BASE_FAMILIES}"
        )
        _check(self.width >= 1, f"width must be >= 1, got {self.width}")
        _check(self.bound > 0, f"bound must be > 0, got {self.bound}")

    @classmethod
    def of(cls, base_cfg: PolicyConfig, width: int, bound: float) -> SteeredConfig:
        """The base's shared fields (window, chunk, keys, normalization, sampler) repeated at top level."""
        shared = {
            k: getattr(base_cfg, k)
            for k in ("n_obs_steps", "horizon", "n_action_steps", "obs_shapes", "action_dim", "fps", "tasks",
                      "normalization", "encoder", "net", "sampler", "num_inference_steps")
        }  # fmt: skip
        return cls(base_config=base_cfg.to_dict(), width=width, bound=bound, **shared)
