"""Returns on the chunk-level MDP: one decision = one action chunk, of which Ta steps are executed.

Shapes: T decisions, N envs. The env's per-step rewards of a decision are summed into the decision's
reward (:func:`chunk_rewards`), and one decision discounts by gamma^Ta (``gamma_chunk``): the chunk is the
action of this MDP, the Ta env steps inside it are not separate decisions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_rewards(step_rewards: Tensor, ta: int) -> Tensor:
    """(N, T * ta) per-step rewards -> (N, T) per-decision sums (steps after an episode's end hold 0)."""
    n, s = step_rewards.shape
    if s % ta:
        raise ValueError(f"{s} env steps are not a whole number of chunks of Ta={ta}")
    return step_rewards.view(n, s // ta, ta).sum(-1)


def chunk_discount(gamma: float, ta: int) -> float:
    """The per-decision discount of a chunk of Ta executed steps: gamma^Ta."""
    return float(gamma) ** int(ta)


def gae(
    rewards: Tensor, values: Tensor, last_values: Tensor, dones: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over decisions: (advantages, returns), both (T, N).

    ``rewards``, ``values``, ``dones`` (T, N): decision t's reward, V(s_t), and whether the episode ended
    at t (then nothing is bootstrapped past it); ``last_values`` (N,) V of the state after the last
    decision (bootstraps a rollout cut before the episode ended). ``gamma`` is the per-decision discount
    (:func:`chunk_discount`). ``delta_t = r_t + gamma (1 - d_t) V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam (1 - d_t) A_{t+1}``, returns = A + V.
    """
    t_len = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    nxt_adv = torch.zeros_like(last_values)
    nxt_val = last_values
    for t in reversed(range(t_len)):
        keep = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * keep * nxt_val - values[t]
        nxt_adv = delta + gamma * lam * keep * nxt_adv
        adv[t] = nxt_adv
        nxt_val = values[t]
    return adv, adv + values


def discounted_returns_to_date(rewards: Tensor, dones: Tensor, gamma: float) -> Tensor:
    """(T, N) ``G_t = gamma G_{t-1} + r_t``, restarting after an episode's end (DPPO's running reward
    scaler divides rewards by the std of these)."""
    g = torch.zeros(rewards.shape[1], dtype=torch.float64)
    out = torch.empty(rewards.shape, dtype=torch.float64)
    for t in range(rewards.shape[0]):
        g = g * gamma + rewards[t].double()
        out[t] = g
        g = torch.where(dones[t].bool(), torch.zeros_like(g), g)
    return out


def merge_moments(stats: Tensor, x: Tensor) -> Tensor:
    """Running (count, mean, M2) merged with the samples ``x`` (Chan et al.'s parallel update); the
    running variance is ``M2 / count``."""
    n, mean, m2 = (float(v) for v in stats)
    x = x.double().reshape(-1)
    bn = len(x)
    if bn == 0:
        return stats.clone()
    bmean = float(x.mean())
    bm2 = float(((x - bmean) ** 2).sum())
    tot = n + bn
    delta = bmean - mean
    return torch.tensor(
        [tot, mean + delta * bn / tot, m2 + bm2 + delta * delta * n * bn / tot], dtype=torch.float64
    )
