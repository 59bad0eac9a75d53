"""A DiT-style action head with cross-attention to condition tokens.

Shapes: B batch, H action chunk length, Da action dim, Nc condition tokens of width Fc.
Action tokens (one per chunk step) run self-attention, cross-attention to the observation/language
tokens, and an MLP; each sub-layer is modulated by adaptive LayerNorm (shift, scale, gate) from the
time embedding plus the pooled condition (DiT's adaLN-Zero: gates start at zero, so the head starts as
the identity plus a zero-initialized output layer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlaflow.policies.nets.unet1d import SinusoidalPosEmb


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: float, dropout: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: Tensor, memory: Tensor, c: Tensor
    ) -> Tensor:  # x (B, H, d), memory (B, Nc, d), c (B, d)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), sh1, sc1)
        mask = None
        if self.causal:
            n = x.shape[1]
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
        x = x + g1.unsqueeze(1) * self.self_attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.norm2(x)
        x = x + self.cross_attn(h, memory, memory, need_weights=False)[0]
        h = _modulate(self.norm3(x), sh2, sc2)
        return x + g2.unsqueeze(1) * self.mlp(h)


class TransformerHead(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, Nc, Fc)) -> (B, H, Da)``."""

    flat_cond = False  # cross-attends to the condition tokens (B, Nc, Fc)

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        n_cond_tokens: int,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = False,
    ):
        super().__init__()
        self.in_proj = nn.Linear(action_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(1, horizon, d_model))
        self.cond_proj = nn.Linear(cond_dim, d_model)
        self.cond_pos = nn.Parameter(torch.zeros(1, n_cond_tokens, d_model))
        self.time = nn.Sequential(
            SinusoidalPosEmb(d_model), nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )
        self.blocks = nn.ModuleList(
            [DiTBlock(d_model, n_heads, mlp_ratio, dropout, causal) for _ in range(n_layers)]
        )
        self.norm_out = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
        self.out = nn.Linear(d_model, action_dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)
        for m in (self.ada_out[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        memory = self.cond_proj(cond) + self.cond_pos  # (B, Nc, d)
        c = self.time(t) + memory.mean(dim=1)  # (B, d)
        h = self.in_proj(x) + self.pos  # (B, H, d)
        for blk in self.blocks:
            h = blk(h, memory, c)
        sh, sc = self.ada_out(c).chunk(2, dim=-1)
        return self.out(_modulate(self.norm_out(h), sh, sc))  # (B, H, Da)
