"""RL-100's offline policy-evaluation gate: accept an update only if a learned model says it improves.

Shapes: B start states, Ds flat state/obs features, Da' flat action (a chunk, flattened), E ensemble size.

An ensemble of small MLP dynamics models predicts ``(s' - s, r)`` from ``(s, a)``; a candidate policy is
rolled out in each member from the same real start states for ``horizon`` decisions and scored by its
discounted imagined return plus ``gamma^H V(s_H)`` (V: the IQL critic's value net, or none). The score is
the mean over members minus ``disagreement_coef`` times their spread (uncertain imagined gains do not pass).
With ``uncertainty_coef`` > 0 each imagined reward is also lowered by that times the members' disagreement
on that very step (MOPO's penalty: the mean over outputs of the std across members of their standardized
predictions at the same (s, a)), which is what keeps a policy acting far from the data from scoring on
the models' extrapolation: the spread of the members' *mean* returns averages that out over the starts.
:func:`gate` accepts the candidate only when its score beats the current policy's by ``margin``.

The model is anything with the ensemble's :class:`GateModel` signature: the diffusion world model stands
behind it (:class:`vlaflow.world_models.gate.WorldModelDynamics`, ``rl100.gate_model=wm``; its E samples are
the members). A model that samples (has ``reset_noise``) is re-seeded at the start of every score, so the
candidate and the current policy are scored on the same model noise, as on the same policy-chain noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from vlaflow.rl.iql import mlp

PolicyFn = Callable[[Tensor], Tensor]  # (B, Ds) -> (B, Da')


class GateModel(Protocol):
    """What the gate needs of a model: E members, their predictions and their standardized outputs."""

    models: Sequence  # one entry per member (E = len)

    def predict(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]: ...  # (E, B, Ds), (E, B)

    def __call__(self, s: Tensor, a: Tensor) -> Tensor: ...  # (E, B, Ds + 1) standardized


class DynamicsEnsemble(nn.Module):
    """E independent MLPs ``(s, a) -> (s' - s, r)``; inputs and targets standardised with the data's stats."""

    def __init__(self, obs_dim: int, act_dim: int, n_models: int = 5, width: int = 128, depth: int = 2):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.models = nn.ModuleList(
            mlp(obs_dim + act_dim, obs_dim + 1, width, depth) for _ in range(n_models)
        )
        for name, d in (("in", obs_dim + act_dim), ("out", obs_dim + 1)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_std", torch.ones(d))

    def set_stats(self, s: Tensor, a: Tensor, s2: Tensor, r: Tensor) -> None:
        x, y = torch.cat([s, a], -1), torch.cat([s2 - s, r[:, None]], -1)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp(min=1e-6))
        self.out_mean.copy_(y.mean(0))
        self.out_std.copy_(y.std(0).clamp(min=1e-6))

    def forward(self, s: Tensor, a: Tensor) -> Tensor:
        """Standardised predictions of every member (E, B, Ds + 1)."""
        x = (torch.cat([s, a], -1) - self.in_mean) / self.in_std
        return torch.stack([m(x) for m in self.models])

    def loss(self, s: Tensor, a: Tensor, s2: Tensor, r: Tensor) -> Tensor:
        y = (torch.cat([s2 - s, r[:, None]], -1) - self.out_mean) / self.out_std
        return ((self(s, a) - y) ** 2).mean()

    def predict(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per member: next state (E, B, Ds) and reward (E, B)."""
        y = self(s, a) * self.out_std + self.out_mean
        return s + y[..., :-1], y[..., -1]


def fit_dynamics(
    model: DynamicsEnsemble,
    s: Tensor,
    a: Tensor,
    s2: Tensor,
    r: Tensor,
    steps: int = 500,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Fit every member on its own bootstrap-free minibatch order; returns the last loss."""
    model.set_stats(s, a, s2, r)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(s), (batch,), generator=g)
        loss = model.loss(s[idx], a[idx], s2[idx], r[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@torch.no_grad()
def imagined_score(
    policy: PolicyFn,
    model: GateModel,
    starts: Tensor,
    horizon: int,
    gamma: float,
    value: Callable[[Tensor], Tensor] | None = None,
    disagreement_coef: float = 1.0,
    uncertainty_coef: float = 0.0,
) -> tuple[float, float]:
    """(score, spread): mean over members of the imagined discounted return (+ gamma^H V(s_H)) from
    ``starts``, minus ``disagreement_coef`` x the members' standard deviation of that return; with
    ``uncertainty_coef``, every imagined reward first lowered by that x the members' per-step disagreement."""
    e = len(model.models)
    reset = getattr(model, "reset_noise", None)
    if reset is not None:  # a sampling model: every policy scored on the same model noise
        reset()
    s = starts.unsqueeze(0).expand(e, *starts.shape).clone()  # (E, B, Ds): each member its own rollout
    ret = torch.zeros(e, starts.shape[0])
    disc = 1.0
    for _ in range(horizon):
        nxt = torch.empty_like(s)
        for i in range(e):
            a = policy(s[i])
            ns, r = model.predict(s[i], a)
            if uncertainty_coef > 0:  # std over members of the standardized predictions at (s_i, a)
                r = r - uncertainty_coef * model(s[i], a).std(0).mean(-1)
            nxt[i], ret[i] = ns[i], ret[i] + disc * r[i]
        s = nxt
        disc *= gamma
    if value is not None:
        ret = ret + disc * torch.stack([value(s[i]) for i in range(e)])
    per_member = ret.mean(1)  # (E,)
    spread = float(per_member.std()) if e > 1 else 0.0
    return float(per_member.mean()) - disagreement_coef * spread, spread


@dataclass(frozen=True)
class GateResult:
    accept: bool
    candidate: float  # candidate's imagined score
    current: float  # current policy's imagined score
    margin: float


def gate(
    candidate: PolicyFn,
    current: PolicyFn,
    model: GateModel,
    starts: Tensor,
    *,
    horizon: int = 20,
    gamma: float = 0.99,
    value: Callable[[Tensor], Tensor] | None = None,
    margin: float = 0.0,
    disagreement_coef: float = 1.0,
    uncertainty_coef: float = 0.0,
) -> GateResult:
    """Accept ``candidate`` iff its imagined score beats ``current``'s by more than ``margin``."""
    kw = {
        "horizon": horizon,
        "gamma": gamma,
        "value": value,
        "disagreement_coef": disagreement_coef,
        "uncertainty_coef": uncertainty_coef,
    }
    cand, _ = imagined_score(candidate, model, starts, **kw)
    cur, _ = imagined_score(current, model, starts, **kw)
    return GateResult(cand > cur + margin, cand, cur, margin)
