"""Two-hot action encoding on fixed bins per action dimension (World4RL's action conditioning).

Shapes: ... any leading dims, Da action dims, Nb bins per dimension.

Each action dimension has its own fixed, increasing bin centres ``bins[d]`` (Nb,). A value ``x`` between two
neighbouring centres ``b_i <= x <= b_{i+1}`` puts weight ``(b_{i+1} - x) / (b_{i+1} - b_i)`` on bin ``i`` and
the rest on bin ``i + 1``; every other bin gets 0. The weights sum to one and their expectation over the bin
centres is ``x`` again, so decoding is exact for values inside ``[b_0, b_{Nb-1}]``. Values outside are
clamped to the end bins first (decoding returns the clamped value): the encoding cannot represent them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlaflow.errors import VlaflowError


def uniform_bins(n_dims: int, n_bins: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    """(Da, Nb) evenly spaced centres on [low, high] per dimension (normalized actions are in [-1, 1])."""
    if n_bins < 2:
        raise VlaflowError(f"two-hot encoding needs n_bins >= 2, got {n_bins}")
    if not high > low:
        raise VlaflowError(f"two-hot bins need high > low, got [{low}, {high}]")
    return torch.linspace(low, high, n_bins).expand(n_dims, n_bins).clone()


def _check_bins(x: Tensor, bins: Tensor) -> None:
    if bins.dim() != 2 or x.shape[-1] != bins.shape[0]:
        raise VlaflowError(
            f"two-hot: actions have {x.shape[-1]} dims, bins are {tuple(bins.shape)} (expected (Da, Nb))"
        )


def two_hot_encode(x: Tensor, bins: Tensor) -> Tensor:
    """(..., Da) -> (..., Da, Nb) two-hot weights (see the module doc)."""
    _check_bins(x, bins)
    bins = bins.to(x.device, x.dtype)
    nb = bins.shape[-1]
    xc = torch.maximum(torch.minimum(x, bins[:, -1]), bins[:, 0])  # (..., Da) clamped into the bin range
    # index of the left neighbour: the number of centres <= x, minus one, kept in 0..Nb-2
    flat = xc.movedim(-1, 0).reshape(bins.shape[0], -1).contiguous()  # (Da, prod(...))
    lo = torch.searchsorted(bins.contiguous(), flat, right=True) - 1
    lo = lo.clamp(0, nb - 2).reshape(xc.movedim(-1, 0).shape).movedim(0, -1)  # (..., Da)
    dims = torch.arange(bins.shape[0], device=x.device).expand_as(lo)
    b_lo, b_hi = bins[dims, lo], bins[dims, lo + 1]
    w_hi = (xc - b_lo) / (b_hi - b_lo)
    out = torch.zeros(*x.shape, nb, device=x.device, dtype=x.dtype)
    out.scatter_(-1, lo.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, (lo + 1).unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def two_hot_decode(w: Tensor, bins: Tensor) -> Tensor:
    """(..., Da, Nb) weights -> (..., Da): the expected bin centre (exact inverse of the encoding)."""
    if w.shape[-2:] != bins.shape:
        raise VlaflowError(f"two-hot: weights end in {tuple(w.shape[-2:])}, bins are {tuple(bins.shape)}")
    return (w * bins.to(w.device, w.dtype)).sum(-1)
