"""Implicit Q-learning (Kostrikov et al. 2021), the critic of RL-100's offline stage.

``V`` regresses the Q-values of the data's actions with the asymmetric *expectile* loss (tau = 0.7 in
RL-100): for tau > 0.5 it tracks an upper expectile of Q over the behaviour's actions, i.e. the value of
the better actions in the data, without ever querying Q at actions outside it. ``Q`` regresses
``r + gamma (1 - done) V(s')`` (double Q: two heads, the minimum of their targets for V). The advantage
``A = min(Q1, Q2)(s, a) - V(s)`` of the chunk is then applied to every denoising step of its chain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlaflow.policies.nets.mlp import mish_mlp


def expectile_loss(diff: Tensor, tau: float) -> Tensor:
    """Mean of ``|tau - 1(diff < 0)| * diff^2`` with ``diff = target - prediction``."""
    w = torch.where(diff < 0, 1.0 - tau, tau)
    return (w * diff * diff).mean()


def uniform_expectile(tau: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """The tau-expectile of U(lo, hi) in closed form: ``lo + (hi - lo) sqrt(tau) / (sqrt(tau) + sqrt(1-tau))``
    (from ``tau E[(X - e)+] = (1 - tau) E[(e - X)+]``)."""
    a, b = tau**0.5, (1 - tau) ** 0.5
    return lo + (hi - lo) * a / (a + b)


mlp = mish_mlp  # one definition: vlaflow.policies.nets.mlp


class IQLCritic(nn.Module):
    """Double Q(s, a) and V(s) on flat features: ``s`` (B, Ds) the obs window, ``a`` (B, Da') the chunk."""

    def __init__(self, obs_dim: int, act_dim: int, width: int = 256, depth: int = 2):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, width, depth), mlp(obs_dim + act_dim, 1, width, depth)
        self.v = mlp(obs_dim, 1, width, depth)

    def qs(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        sa = torch.cat([s, a], -1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def value(self, s: Tensor) -> Tensor:
        return self.v(s).squeeze(-1)


def iql_losses(
    critic: IQLCritic,
    target: IQLCritic,
    s: Tensor,
    a: Tensor,
    r: Tensor,
    s2: Tensor,
    done: Tensor,
    gamma: float,
    tau: float = 0.7,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The sum of IQL's value (expectile) and Q (TD) losses on one batch; ``target`` is the Polyak copy."""
    with torch.no_grad():
        tq = torch.minimum(*target.qs(s, a))
        next_v = critic.value(s2)
        q_target = r + gamma * (1.0 - done.float()) * next_v
    v = critic.value(s)
    lv = expectile_loss(tq - v, tau)
    q1, q2 = critic.qs(s, a)
    lq = 0.5 * (((q1 - q_target) ** 2).mean() + ((q2 - q_target) ** 2).mean())
    return lv + lq, {"v_loss": lv.detach(), "q_loss": lq.detach()}


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, rate: float) -> None:
    """``target <- (1 - rate) target + rate source`` (rate = 0.005 in IQL)."""
    for pt, ps in zip(target.parameters(), source.parameters(), strict=True):
        pt.mul_(1 - rate).add_(ps, alpha=rate)
