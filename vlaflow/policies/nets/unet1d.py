"""Diffusion Policy's 1-D temporal convolutional U-Net with FiLM conditioning (Chi et al., 2023).

Shapes: B batch, H action chunk length, Da action dim, Dc flattened condition width.
Residual blocks are Conv1d -> GroupNorm -> Mish (twice); each block's first activation is modulated
per channel by FiLM (scale, bias) predicted from ``[diffusion-step embedding ; flattened obs features]``.
The blocks call their Conv1d / GroupNorm / Mish / Linear kernels functionally and, outside autograd, share
one Mish of the FiLM input: at batch 1 (a robot's control step) module dispatch was a tenth of the time.
Outputs and gradients are bit-identical to calling every module (forward hooks on those inner modules
do not fire).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of a (float) time, max period 10000."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(
            torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1))
        )
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
        )

    def forward(self, x: Tensor) -> Tensor:
        # The modules' own kernels called directly: at batch 1 the three module dispatches per block cost
        # about as much as the GroupNorm and Mish arithmetic (same ops, so bit-identical outputs).
        conv, norm, _ = self.block
        x = F.conv1d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.mish(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


class ConditionalResidualBlock1D(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, n_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Conv1dBlock(c_in, c_out, kernel, n_groups), Conv1dBlock(c_out, c_out, kernel, n_groups)]
        )
        self.c_out = c_out
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))  # FiLM scale and bias
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self._residual_conv = c_in != c_out

    def forward(self, x: Tensor, cond: Tensor, mished_cond: Tensor | None = None) -> Tensor:
        """x (B, C, H), cond (B, Dcond) -> (B, c_out, H); ``mished_cond`` is ``mish(cond)`` when the caller
        already has it (cond_encoder = Mish -> Linear, and every block of a U-Net reads the same cond)."""
        first, second = self.blocks
        _, film = self.cond_encoder
        out = first(x)
        m = F.mish(cond) if mished_cond is None else mished_cond
        scale, bias = F.linear(m, film.weight, film.bias).unsqueeze(-1).chunk(2, dim=1)
        out = scale * out + bias
        out = second(out)
        if self._residual_conv:
            return out + F.conv1d(x, self.residual.weight, self.residual.bias)
        return out + x


class ConditionalUnet1D(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, Dc)) -> (B, H, Da)``."""

    flat_cond = True  # reads the condition tokens flattened to (B, Nc * Fc)

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: tuple[int, ...] = (128, 256, 512),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 128,
    ):
        super().__init__()
        self.step_encoder = nn.Sequential(
            SinusoidalPosEmb(step_embed_dim),
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        film_dim = step_embed_dim + cond_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))

        def res(ci, co):
            return ConditionalResidualBlock1D(ci, co, film_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for i, (ci, co) in enumerate(pairs):
            last = i == len(pairs) - 1
            down = nn.Conv1d(co, co, 3, 2, 1) if not last else nn.Identity()
            self.down.append(nn.ModuleList([res(ci, co), res(co, co), down]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([res(mid, mid), res(mid, mid)])
        self.up = nn.ModuleList()
        # As in Diffusion Policy: every up level upsamples (undoing the len-1 downsamplings); the
        # finest skip is left unused.
        for ci, co in reversed(pairs[1:]):
            self.up.append(nn.ModuleList([res(co * 2, ci), res(ci, ci), nn.ConvTranspose1d(ci, ci, 4, 2, 1)]))
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # (B, Da, H)
        film = torch.cat([self.step_encoder(t), cond], dim=-1)
        # Every block's FiLM projection reads mish(film): shared when no gradient is recorded. Under autograd
        # each block keeps its own Mish, so gradients accumulate in the order they always did.
        m = None if torch.is_grad_enabled() else F.mish(film)
        skips = []
        for r1, r2, down in self.down:
            h = r2(r1(h, film, m), film, m)
            skips.append(h)
            h = down(h)
        for mid in self.mid:
            h = mid(h, film, m)
        for r1, r2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = r2(r1(h, film, m), film, m)
            h = up(h)
        block, out = self.final
        h = block(h)
        return F.conv1d(h, out.weight, out.bias).transpose(1, 2)  # (B, H, Da)


def group_channel_subset(t: int, s: int, groups: int) -> list[int]:
    """Channels kept when a width-``t`` GroupNorm space narrows to ``s``: the first s/g of every group."""
    per_t, per_s = t // groups, s // groups
    return [g * per_t + i for g in range(groups) for i in range(per_s)]


def narrowed_state(teacher_sd: dict, student_sd: dict, groups: int) -> dict:
    """A :class:`ConditionalUnet1D` state dict cut to a narrower one's shapes (same levels, kernel, groups).

    Every width-T channel space keeps the same channels (:func:`group_channel_subset`), so residual
    streams, skips and FiLM stay aligned. Two kinds of axes are two spaces side by side and are cut half by
    half: FiLM's (scale ; bias) outputs, and the input of an up level's first block (upsampled ; skip). A
    structured-pruning start for a distilled student: far closer to the teacher's map than a random init.
    """
    out = {}
    for k, v in student_sd.items():
        w = teacher_sd[k]
        parts = k.split(".")
        doubled = set()
        if "cond_encoder" in parts:
            doubled.add(0)  # Linear(film, 2 c): scale then bias
        if parts[0] == "up" and parts[2] == "0" and (parts[3] == "residual" or parts[3:5] == ["blocks", "0"]):
            doubled.add(1)  # conv over cat(h, skip)
        for dim, (a, b) in enumerate(zip(w.shape, v.shape, strict=True)):
            if a == b:
                continue
            if dim in doubled:
                keep = group_channel_subset(a // 2, b // 2, groups)
                idx = keep + [a // 2 + i for i in keep]
            else:
                idx = group_channel_subset(a, b, groups)
            w = w.index_select(dim, torch.tensor(idx))
        out[k] = w.clone()
    return out
