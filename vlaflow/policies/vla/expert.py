"""The action expert: a smaller transformer over the H action tokens that attends to the prefix KV cache.

Shapes: B batch, H action chunk length, Da action dim, P prefix tokens, L layers (one per backbone layer
used), Hq query heads, Hkv key/value heads, Dh head width (the backbone's), w expert width.

pi0's layout: the expert has its own weights and width but the backbone's head layout, so at layer l its
queries attend to ``[K_l prefix ; K_l actions]`` in one softmax (pi0 / SmolVLA's joint attention): action
tokens see the whole valid prefix and each other (bidirectionally); the prefix never sees the actions,
which is why its keys/values can be computed once per control step (``encode``) and reused by every
denoising step. The time enters as in pi0: ``MLP([action embedding ; sinusoidal time embedding])``.
Positions continue after the prefix's valid tokens (rotary, the backbone's own frequencies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlaflow.policies.nets.unet1d import SinusoidalPosEmb
from vlaflow.policies.vla.backbone import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, written out (the TorchScript ONNX exporter has no
    ``aten::rms_norm``)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ExpertLayer(nn.Module):
    def __init__(self, width: int, n_heads: int, n_kv: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.input_norm = RMSNorm(width)
        self.q_proj = nn.Linear(width, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(width, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, width, bias=False)
        self.post_norm = RMSNorm(width)
        hidden = int(width * mlp_ratio)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, h: Tensor, prefix_kv: Tensor, mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """h (B, H, w); prefix_kv (B, P, 2, Hkv, Dh); mask (B, 1, 1, P + H) bool."""
        b, n, _ = h.shape
        x = self.input_norm(h)
        q = apply_rotary(self.q_proj(x).view(b, n, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, n, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim)
        k = torch.cat([prefix_kv[:, :, 0].to(k.dtype), k], dim=1).transpose(1, 2)  # (B, Hkv, P + H, Dh)
        v = torch.cat([prefix_kv[:, :, 1].to(v.dtype), v], dim=1).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        if rep > 1:  # grouped-query attention: each key/value head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)  # (B, Hq, H, Dh)
        h = h + self.o_proj(att.transpose(1, 2).reshape(b, n, -1))
        x = self.post_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class ActionExpert(nn.Module):
    """``forward(x_t (B, H, Da), model_time (B,), kv (B, P, L, 2, Hkv, Dh), valid (B, P)) -> (B, H, Da)``."""

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        n_layers: int,
        n_heads: int,
        n_kv: int,
        head_dim: int,
        width: int,
        mlp_ratio: float,
    ):
        super().__init__()
        if n_heads % n_kv:
            raise ValueError(f"expert query heads {n_heads} must be a multiple of the key/value heads {n_kv}")
        self.horizon = horizon
        self.action_in = nn.Linear(action_dim, width)
        self.time_emb = SinusoidalPosEmb(width)
        self.time_mlp_in = nn.Linear(2 * width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.layers = nn.ModuleList(
            [ExpertLayer(width, n_heads, n_kv, head_dim, mlp_ratio) for _ in range(n_layers)]
        )
        self.norm = RMSNorm(width)
        self.action_out = nn.Linear(width, action_dim)

    def forward(
        self,
        x_t: Tensor,
        model_time: Tensor,
        kv: Tensor,
        valid: Tensor,
        rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    ) -> Tensor:
        b, n, _ = x_t.shape
        a = self.action_in(x_t)  # (B, H, w)
        te = self.time_emb(model_time).to(a.dtype)[:, None].expand(b, n, -1)  # (B, H, w)
        h = self.time_mlp_out(F.silu(self.time_mlp_in(torch.cat([a, te], dim=-1))))
        n_valid = valid.sum(-1, keepdim=True)  # (B, 1)
        pos = n_valid + torch.arange(n, device=x_t.device)[None]  # (B, H): after the prefix's valid tokens
        cos, sin = rotary(h, pos)
        ones = torch.ones(b, n, dtype=torch.bool, device=x_t.device)
        mask = torch.cat([valid, ones], dim=1)[:, None, None, :]  # (B, 1, 1, P + H)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv[:, :, i], mask, cos.to(h.dtype), sin.to(h.dtype))
        return self.action_out(self.norm(h))  # (B, H, Da)
