"""Config of a GPC-composed policy: the parents' full configs (embedded), convex weights, reference parent."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from vlaflow.policies.base_config import NetConfig, PolicyConfig, _check

# Families a composite may mix: denoising policies on a Gaussian path with a multi-step sampler.
PARENT_FAMILIES = ("diffusion", "flow")


@dataclass(frozen=True)
class ComposedConfig(PolicyConfig):
    family: str = "composed"  # registry name (fixed)
    net: NetConfig = field(default_factory=lambda: NetConfig(kind="transformer"))  # unused; parents' nets
    sampler: str = ""  # sampler of the composite ("" = the reference parent's, resolved at construction)
    parent_configs: tuple[dict[str, Any], ...] = ()  # each parent's config.to_dict() (weights in the module)
    parent_paths: tuple[str, ...] = ()  # where the parents were loaded from (provenance only)
    weights: tuple[float, ...] = ()  # convex weights, one per parent (>= 0, sum 1)
    reference: int = -1  # parent whose path / time grid / sampler drive the composite (-1 = heaviest)
    space: str = ""  # parameterization the predictions are mixed in ("" = the reference's native one)

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("", "ddim", "ddpm", "euler", "heun")

    def __post_init__(self):
        _check(self.family == "composed", f"ComposedConfig.family must be 'composed', got {self.family!r}")
        super().__post_init__()
        _check(len(self.parent_configs) >= 2, f"need >= 2 parent configs, got {len(self.parent_configs)}")
        for i, d in enumerate(self.parent_configs):
            _check(
                d.get("family") in PARENT_FAMILIES,
                f"parent_configs[{i}] is a {d.get('family')!r} policy; composition needs denoising parents "
                f"({', '.join(PARENT_FAMILIES)})",
            )
        _check(
            len(self.weights) == len(self.parent_configs),
            f"weights {list(self.weights)} must have one entry per parent ({len(self.parent_configs)})",
        )
        _check(
            all(w >= 0 for w in self.weights) and abs(sum(self.weights) - 1) <= 1e-6,
            f"weights must be >= 0 and sum to 1, got {list(self.weights)}",
        )
        _check(
            -1 <= self.reference < len(self.parent_configs),
            f"reference must be -1 or a parent index < {len(self.parent_configs)}, got {self.reference}",
        )
        _check(
            self.space in ("", "eps", "x0", "velocity", "v"),
            f"space must be '', 'eps', 'x0', 'velocity' or 'v', got {self.space!r}",
        )
        if not self.sampler:
            # Resolved here, not in the model: code written for any policy (RTC, export, RL) reads
            # config.sampler as the default sampler, and a checkpoint's loader re-installs the saved config.
            ref_sampler = str(self.parent_configs[self.reference_index].get("sampler") or "")
            _check(
                ref_sampler in self._SAMPLERS[1:],
                f"the reference parent's sampler {ref_sampler!r} is not one of {self._SAMPLERS[1:]}",
            )
            object.__setattr__(self, "sampler", ref_sampler)

    @property
    def reference_index(self) -> int:
        """The reference parent: ``reference``, or the heaviest (first on ties), as
        :func:`vlaflow.policies.compose.default_reference` chooses."""
        if self.reference >= 0:
            return self.reference
        w = self.weights
        return max(range(len(w)), key=lambda i: (w[i], -i))
