"""A residual MLP action head: the whole chunk as one vector, for latency budgets a conv U-Net misses.

Shapes: B batch, H action chunk length, Da action dim, Dc flattened condition width.
``[x_t flattened (H*Da) ; step embedding ; cond (Dc)] -> Linear -> n_blocks x (LayerNorm -> Linear ->
Mish -> Linear, residual) -> LayerNorm -> Linear -> (H*Da)``. At batch 1 it is a handful of matrix-vector
products (about ``n_blocks * 2 * width**2`` multiply-adds), so a runtime's per-operator overhead, not the
arithmetic, sets its latency; that is what a one-step distilled student needs on a CPU control loop. It
has no temporal inductive bias, so as a from-scratch denoiser it wants more data than the U-Net.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlaflow.policies.nets.unet1d import SinusoidalPosEmb


def mish_mlp(inp: int, out: int, width: int = 256, depth: int = 2, layer_norm: bool = False) -> nn.Sequential:
    """``depth`` x (Linear [-> LayerNorm] -> Mish) -> Linear: RL's small nets (critics, values, dynamics,
    noise actor). LayerNorm in a critic bounds how far its TD bootstrap can run away (RLPD, DSRL)."""
    layers: list[nn.Module] = []
    d = inp
    for _ in range(depth):
        layers += [nn.Linear(d, width), *([nn.LayerNorm(width)] if layer_norm else []), nn.Mish()]
        d = width
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.Mish(), nn.Linear(width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class MLPHead(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, Dc)) -> (B, H, Da)``."""

    flat_cond = True  # reads the condition tokens flattened to (B, Nc * Fc)

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        width: int = 512,
        n_blocks: int = 3,
        step_embed_dim: int = 64,
    ):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.step_encoder = SinusoidalPosEmb(step_embed_dim)
        self.inp = nn.Linear(horizon * action_dim + step_embed_dim + cond_dim, width)
        self.blocks = nn.Sequential(*(ResidualMLPBlock(width) for _ in range(n_blocks)))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, horizon * action_dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), self.step_encoder(t), cond], dim=-1)
        h = self.blocks(self.inp(h))
        return self.out(h).view(-1, self.horizon, self.action_dim)
