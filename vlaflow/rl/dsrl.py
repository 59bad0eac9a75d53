"""DSRL (arXiv 2506.15799): steer a frozen denoiser by choosing its initial noise with SAC.

Shapes: B batch, Fo observation features (the frozen policy's flattened obs encoding), Dw = H * Da the
noise's size (the chunk's shape, flattened).

The denoiser and its deterministic sampler (DDIM eta = 0 / flow Euler) stay frozen; the *action* of this
MDP is the initial noise ``w``, bounded to ``[-bound, bound]^Dw`` by a tanh (DSRL: |w| <= 1.5 per dim; the
public code's bound handling has known bugs, here the bound is applied once, in :class:`NoiseActor`, which
lives in ``vlaflow.policies.steered`` because a refined checkpoint runs it, and the log-density carries the
tanh and scale Jacobians). The critic learns Q(obs, w) from the env reward of the executed chunk. With the
actor's mean at zero noise and ``deterministic=True``, the policy is plain sampling from w = 0. Because the
noise is an input, this composes with every sampler (ONNX export of the actor is not supported yet).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlaflow.policies.steered.actor import NoiseActor, mlp


class TwinQ(nn.Module):
    """Two Q(obs, w) heads (B,) each."""

    def __init__(self, obs_dim: int, noise_dim: int, width: int = 256, layer_norm: bool = True):
        super().__init__()
        d = obs_dim + noise_dim
        self.q1, self.q2 = mlp(d, 1, width, 2, layer_norm), mlp(d, 1, width, 2, layer_norm)

    def forward(self, obs: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, w], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class SAC(nn.Module):
    """Actor, twin critics and the entropy temperature; :meth:`losses` is one SAC update's scalar loss."""

    def __init__(
        self,
        obs_dim: int,
        noise_dim: int,
        bound: float = 1.5,
        width: int = 256,
        init_alpha=0.1,
        target_entropy_per_dim: float = -1.0,
        critic_layer_norm: bool = True,
    ):
        super().__init__()
        self.actor = NoiseActor(obs_dim, noise_dim, bound, width)
        self.q = TwinQ(obs_dim, noise_dim, width, critic_layer_norm)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))
        # SAC's usual -1 per dim; DSRL's released configs use 0 (target_ent 0.0) in the noise space
        self.target_entropy = float(target_entropy_per_dim) * float(noise_dim)

    def losses(
        self,
        target_q: TwinQ,
        obs: Tensor,
        w: Tensor,
        reward: Tensor,
        next_obs: Tensor,
        done: Tensor,
        gamma: float,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """critic TD loss + actor loss (critics' parameters not updated by it) + temperature loss."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            w2, lp2 = self.actor(next_obs, generator=generator)
            tq = torch.minimum(*target_q(next_obs, w2)) - alpha * lp2
            y = reward + gamma * (1.0 - done.float()) * tq
        q1, q2 = self.q(obs, w)
        critic = 0.5 * (((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
        wp, lp = self.actor(obs, generator=generator)
        req = [p.requires_grad for p in self.q.parameters()]
        self.q.requires_grad_(False)  # the actor's loss flows through Q to w, not into Q's weights
        try:
            qp = torch.minimum(*self.q(obs, wp))
        finally:
            for p, r in zip(self.q.parameters(), req, strict=True):
                p.requires_grad_(r)
        actor = (alpha * lp - qp).mean()
        temp = -(self.log_alpha * (lp.detach() + self.target_entropy)).mean()
        stats = {
            "q_loss": critic.detach(),
            "actor_loss": actor.detach(),
            "alpha": alpha,
            "q": q1.mean().detach(),
        }
        return critic + actor + temp, stats


class ReplayBuffer:
    """A fixed-capacity ring of (obs, w, reward, next_obs, done) tensors; its state is plain tensors."""

    FIELDS = ("obs", "w", "reward", "next_obs", "done")

    def __init__(self, capacity: int):
        self.capacity, self.data, self.n, self.head = int(capacity), {}, 0, 0

    def add(self, **items: Tensor) -> None:
        b = len(items["obs"])
        if not self.data:
            self.data = {
                k: torch.zeros((self.capacity, *items[k].shape[1:]), dtype=items[k].dtype)
                for k in self.FIELDS
            }
        idx = (self.head + torch.arange(b)) % self.capacity
        for k in self.FIELDS:
            self.data[k][idx] = items[k].detach().cpu().to(self.data[k].dtype)
        self.head = int((self.head + b) % self.capacity)
        self.n = min(self.n + b, self.capacity)

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = torch.randint(0, self.n, (batch,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state(self) -> dict[str, Tensor]:
        out = {f"replay/{k}": v[: self.n] if self.n < self.capacity else v for k, v in self.data.items()}
        out["replay_meta"] = torch.tensor([self.n, self.head])
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        n, head = (int(v) for v in tensors["replay_meta"].tolist())
        self.data = {}
        for k in self.FIELDS:
            v = tensors[f"replay/{k}"]
            full = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
            full[: len(v)] = v
            self.data[k] = full
        self.n, self.head = n, head


@torch.no_grad()
def polyak(target: nn.Module, source: nn.Module, rate: float) -> None:
    for pt, ps in zip(target.parameters(), source.parameters(), strict=True):
        pt.mul_(1 - rate).add_(ps, alpha=rate)
