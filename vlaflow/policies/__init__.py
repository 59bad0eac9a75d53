"""Generative action policies: one contract (encode / predict / samplers over a Gaussian path), two
families (``diffusion``, ``flow``; ``vla``: the VLM-prefix policy), shared nets, checkpoints and the
runtime behind ``vlaflow.load_policy``.

Exports load on first use, so importing a submodule does not build every family.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_policy": "vlaflow.policies.registry",
    "policy_config_from_dict": "vlaflow.policies.registry",
    "POLICY_FAMILIES": "vlaflow.policies.registry",
    "save_checkpoint": "vlaflow.policies.checkpoint",
    "load_checkpoint": "vlaflow.policies.checkpoint",
    "load_checkpoint_extras": "vlaflow.policies.checkpoint",
    "PolicyRuntime": "vlaflow.policies.runtime",
    "load_policy": "vlaflow.policies.runtime",
    "DiffusionConfig": "vlaflow.policies.diffusion.config",
    "FlowConfig": "vlaflow.policies.flow.config",
    "DiffusionPolicy": "vlaflow.policies.diffusion.model",
    "FlowPolicy": "vlaflow.policies.flow.model",
    "VLAConfig": "vlaflow.policies.vla.config",
    "VLAPolicy": "vlaflow.policies.vla.model",
    "DenoisingPolicy": "vlaflow.policies.contract",
    "PolicyConfig": "vlaflow.policies.base_config",
    "EncoderConfig": "vlaflow.policies.base_config",
    "LanguageConfig": "vlaflow.policies.base_config",
    "NetConfig": "vlaflow.policies.base_config",
    "UNetConfig": "vlaflow.policies.base_config",
    "MLPConfig": "vlaflow.policies.base_config",
    "TransformerConfig": "vlaflow.policies.base_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlaflow.policies' has no attribute {name!r}")
