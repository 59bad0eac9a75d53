"""PPO-clip over the denoising steps (DPPO / RL-100): one advantage per chunk, a ratio per denoising step.

Shapes: B transitions (chunks), K' recorded denoising steps (oldest = noisiest first).

Every recorded step k of a chunk is a Gaussian policy ``p(x_{k+1} | x_k, obs)`` acting in the inner MDP
of the denoising chain; its reward is the chunk's (the env gives nothing inside the chain), so each step
takes the chunk's advantage. The denoising discount weights step k by ``gamma_denoise^(K' - 1 - k)``: the
last (cleanest) step has weight 1, noisier steps less (DPPO's down-weighting of noisy steps).
"""

from __future__ import annotations

import torch
from torch import Tensor


def denoise_weights(k: int, gamma_denoise: float, device=None) -> Tensor:
    """(K',) weights ``gamma_denoise^(K'-1-k)`` for steps k = 0..K'-1 (the last step weighs 1)."""
    return gamma_denoise ** torch.arange(k - 1, -1, -1, dtype=torch.float32, device=device)


def ppo_clip_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, clip: float, gamma_denoise: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate over (B, K') per-step log-probs and (B,) chunk advantages -> (loss, stats).

    ``loss = -sum_k w_k mean_b min(r A, clip(r, 1-c, 1+c) A) / sum_k w_k`` with ``r = exp(logp - old)``;
    stats: ``approx_kl`` (mean of (r - 1) - log r, Schulman's unbiased estimator), ``clipfrac``, ``ratio``.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    a = adv.unsqueeze(1)
    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)  # (B, K')
    w = denoise_weights(logp.shape[1], gamma_denoise, logp.device)
    loss = -(surr.mean(0) * w).sum() / w.sum()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clipfrac": ((ratio - 1).abs() > clip).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def value_loss(v: Tensor, returns: Tensor, old_v: Tensor | None = None, clip: float = 0.0) -> Tensor:
    """0.5 * MSE of the value head against the returns, optionally clipped around the rollout's values."""
    err = (v - returns) ** 2
    if old_v is not None and clip > 0:
        vc = old_v + (v - old_v).clamp(-clip, clip)
        err = torch.maximum(err, (vc - returns) ** 2)
    return 0.5 * err.mean()


def normalize_advantages(adv: Tensor, eps: float = 1e-8) -> Tensor:
    return (adv - adv.mean()) / (adv.std() + eps) if adv.numel() > 1 else adv
