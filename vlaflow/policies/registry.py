"""The policy-family registry: one ``dict[str, type]`` from ``family`` to its policy class.

Each policy class names its config class (``config_class``), so the same entry rebuilds configs from
JSON and policies from configs. A composite (GPC) embeds its parents' configs: :func:`build_policy` builds
the parents first, here, and hands them to it, so ``composed/`` never needs this module (no import cycle);
likewise a steered policy's frozen base.
"""

from __future__ import annotations

import difflib
from typing import Any

from vlaflow.errors import ConfigError
from vlaflow.policies.base_config import PolicyConfig, dataclass_from_dict
from vlaflow.policies.composed.config import ComposedConfig
from vlaflow.policies.composed.model import ComposedPolicy
from vlaflow.policies.consistency.model import ConsistencyPolicy
from vlaflow.policies.diffusion.model import DiffusionPolicy
from vlaflow.policies.ebt.model import EBTPolicy
from vlaflow.policies.flow.model import FlowPolicy
from vlaflow.policies.steered.config import SteeredConfig
from vlaflow.policies.steered.model import SteeredPolicy
from vlaflow.policies.vla.model import VLAPolicy

POLICY_FAMILIES: dict[str, type] = {
    "diffusion": DiffusionPolicy,
    "flow": FlowPolicy,
    "consistency": ConsistencyPolicy,  # one-step student from `vlaflow distill`
    "ebt": EBTPolicy,  # energy transformer, actions by gradient descent on the energy
    "composed": ComposedPolicy,  # GPC mix of denoising parents, built by `vlaflow compose`
    "steered": SteeredPolicy,  # frozen denoiser + DSRL noise actor, written by `vlaflow refine --algo dsrl`
    "vla": VLAPolicy,  # VLM-prefix policy (pi0 / SmolVLA): prefix KV cache + action expert
}


def policy_class(family: str) -> type:
    if family not in POLICY_FAMILIES:
        near = difflib.get_close_matches(str(family), list(POLICY_FAMILIES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown policy family {family!r}; known: {sorted(POLICY_FAMILIES)}{hint}")
    return POLICY_FAMILIES[family]


def policy_config_from_dict(d: dict[str, Any]) -> PolicyConfig:
    """Rebuild a family config from ``cfg.to_dict()`` output (keyed by its ``family`` field)."""
    if "family" not in d:
        raise ConfigError(f"policy config has no 'family' field; expected one of {sorted(POLICY_FAMILIES)}")
    return dataclass_from_dict(policy_class(d["family"]).config_class, dict(d))


def build_policy(config: PolicyConfig, stats: dict):
    """A fresh policy module for ``config`` with normalizer ``stats`` (from ``compute_stats``).

    A composed config's parents are built from their embedded configs, each with its share of ``stats``
    (a missing key is the parent's clear error), and passed to the composite.
    """
    cls = policy_class(config.family)
    if isinstance(config, ComposedConfig):
        parents = []
        for d in config.parent_configs:
            pcfg = policy_config_from_dict(dict(d))
            parents.append(build_policy(pcfg, {k: stats[k] for k in pcfg.norm_modes() if k in stats}))
        return cls(config, stats, parents)
    if isinstance(config, SteeredConfig):  # the frozen base from its embedded config, the actor beside it
        return cls(config, stats, build_policy(policy_config_from_dict(dict(config.base_config)), stats))
    return cls(config, stats)
