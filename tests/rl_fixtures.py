"""Tiny PushT-shaped policies shared by the RL, steering and world-model tests (built in well under a second).

Raw ranges as PushT's: actions 50..450 px, states 0..512; a 2-level U-Net of widths 8 / 16.
"""

from __future__ import annotations

import numpy as np
import torch


def tiny_pusht_policy(
    family: str = "diffusion", obs_key: str = "obs.state", shape=(5,), action_dim: int = 2, **over
):
    """An untrained ``family`` ("diffusion" | "flow") policy on ``obs_key`` of ``shape``, seeded (train mode);
    ``over`` replaces config fields (``sampler``, ``num_inference_steps``, ...)."""
    from vlaflow.policies import DiffusionConfig, FlowConfig, NetConfig, UNetConfig, build_policy

    act = np.full(action_dim, 1.0, np.float32)
    stats = {
        "action": {"min": 50.0 * act, "max": 450.0 * act},
        obs_key: {"min": np.zeros(shape, np.float32), "max": np.full(shape, 512.0, np.float32)},
    }
    for v in stats.values():
        v["mean"], v["std"] = (v["min"] + v["max"]) / 2, (v["max"] - v["min"]) / 4
    net = NetConfig(
        kind="unet", unet=UNetConfig(down_dims=(8, 16), kernel_size=3, n_groups=4, step_embed_dim=8)
    )
    cls = DiffusionConfig if family == "diffusion" else FlowConfig
    cfg = cls(obs_shapes={obs_key: tuple(shape)}, action_dim=action_dim, horizon=8, n_action_steps=4, net=net,
              fps=10.0, **over)  # fmt: skip
    torch.manual_seed(0)
    return build_policy(cfg, stats)


def scramble_(policy, seed: int = 1):
    """Corrupt ``policy`` in place: every weight tensor's entries shuffled, plus noise of its own scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=g)])
            p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))
    return policy
