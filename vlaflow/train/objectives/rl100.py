"""RL-100's offline stage as two objectives of the one training loop: the IQL critic, then PPO over the chain.

Shapes: B transitions or windows, Ds flat obs-window features, Da' = H x Da the flat normalized chunk,
K' recorded denoising steps.

* :class:`IQLObjective` fits a double-Q + value critic (:mod:`vlaflow.rl.iql`, expectile 0.7) on
  chunk-level transitions ``(s, a, r, s', done)``: ``s`` the obs window at a decision, ``a`` the H-step
  chunk from there (normalized), ``r`` the reward of its Ta executed steps. ``after_step`` Polyak-updates
  the target Q. The checkpoint deploys the (unchanged) policy the critic was fit for; the critic is in the
  run's resume state (``model/critic.*``).
* :class:`OfflinePPO` refines the policy on store windows without env steps: every round, ``n_windows``
  windows are drawn, the stochastic chain samples a chunk for each (its last K' steps recorded,
  :func:`vlaflow.rl.chain.sample_chain`), the frozen critic scores the *final* chunk, ``A = min Q - V``
  (normalized), and that one advantage is applied to every denoising step: PPO-clip per step
  (:func:`vlaflow.rl.ppo.ppo_clip_loss`) on the steps re-scored under the current weights
  (:func:`vlaflow.rl.chain.rescore`). ``update_epochs x n_minibatches`` loop steps per round.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import vlaflow.train.schedule as S
from vlaflow.errors import VlaflowError
from vlaflow.rl.chain import ChainConfig, rescore, resolve_chain, sample_chain
from vlaflow.rl.iql import IQLCritic, iql_losses, polyak
from vlaflow.rl.ppo import normalize_advantages, ppo_clip_loss
from vlaflow.train.objective import Objective
from vlaflow.train.objectives.bc import make_batch
from vlaflow.train.objectives.dppo import NonFiniteRL, minibatch


def flat_obs(obs: dict[str, Tensor], keys: Sequence[str]) -> Tensor:
    """Obs windows {key: (B, To, ...)} -> (B, Ds) features, keys in the policy's order (inverse:
    :func:`vlaflow.interfaces.unflat_obs`)."""
    return torch.cat([torch.as_tensor(obs[k]).float().flatten(1) for k in keys], -1)


class StandardizedCritic(IQLCritic):
    """:class:`~vlaflow.rl.iql.IQLCritic` on obs features standardized by the data's mean/std (buffers)."""

    def __init__(self, obs_dim: int, act_dim: int, width: int = 256, depth: int = 2):
        super().__init__(obs_dim, act_dim, width, depth)
        self.register_buffer("s_mean", torch.zeros(obs_dim))
        self.register_buffer("s_std", torch.ones(obs_dim))

    def set_stats(self, s: Tensor) -> None:
        self.s_mean.copy_(s.mean(0))
        self.s_std.copy_(s.std(0).clamp(min=1e-6) if len(s) > 1 else torch.ones_like(self.s_mean))

    def _z(self, s: Tensor) -> Tensor:
        return (s - self.s_mean) / self.s_std

    def qs(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return super().qs(self._z(s), a)

    def value(self, s: Tensor) -> Tensor:
        return super().value(self._z(s))

    def advantage(self, s: Tensor, a: Tensor) -> Tensor:
        return torch.minimum(*self.qs(s, a)) - self.value(s)


TRANSITION_KEYS = ("s", "a", "r", "s2", "done")


class IQLObjective(Objective):
    """IQL on chunk transitions; ``module = ModuleDict(critic, target)``, only ``critic`` is optimised."""

    prefetch = "parallel"  # a batch is a pure function of the step

    def __init__(
        self,
        policy: nn.Module,
        transitions: dict[str, Tensor],
        *,
        gamma: float,
        expectile: float = 0.7,
        polyak_rate: float = 0.005,
        batch_size: int = 256,
        width: int = 256,
        seed: int = 0,
    ):
        missing = [k for k in TRANSITION_KEYS if k not in transitions]
        if missing or len(transitions["s"]) == 0:
            raise VlaflowError(f"IQL needs transitions with {TRANSITION_KEYS}; missing {missing} or empty")
        self.policy, self.data = policy, transitions
        self.gamma, self.expectile, self.rate = float(gamma), float(expectile), float(polyak_rate)
        self.batch_size, self.seed = int(batch_size), int(seed)
        torch.manual_seed(self.seed)
        critic = StandardizedCritic(transitions["s"].shape[1], transitions["a"].shape[1], width)
        critic.set_stats(transitions["s"])
        target = copy.deepcopy(critic).requires_grad_(False)
        self.module = nn.ModuleDict({"critic": critic, "target": target})

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.module["critic"].parameters())}]

    def deploy(self, module: nn.Module) -> nn.Module:
        return self.policy  # the checkpoint's policy files: the policy this critic was fit for

    def batch(self, step: int) -> dict[str, Tensor]:
        n = len(self.data["s"])
        idx = torch.from_numpy(S.batch_indices(self.seed, step, n, min(self.batch_size, n)))
        return {k: self.data[k][idx] for k in TRANSITION_KEYS}

    def loss(self, b: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        m = self.module
        loss, st = iql_losses(
            m["critic"], m["target"], b["s"], b["a"], b["r"], b["s2"], b["done"], self.gamma, self.expectile
        )
        return loss, st

    def after_step(self, step: int) -> None:
        polyak(self.module["target"], self.module["critic"], self.rate)


class OfflinePPO(Objective):
    """PPO-clip per denoising step on store windows, the critic's advantage of the final chunk on every step.

    ``module`` is the policy itself (the checkpoint is a normal policy checkpoint). The round's buffer and
    the counters are ``extra_state``, so a killed stage resumes exactly.
    """

    prefetch = "none"  # a round's chains need that round's weights

    def __init__(
        self,
        policy: nn.Module,
        critic: StandardizedCritic,
        windows,
        *,
        chain: ChainConfig,
        logprob: str = "mean_executed",
        n_windows: int = 256,
        update_epochs: int = 4,
        n_minibatches: int = 4,
        clip: float = 0.01,
        gamma_denoise: float = 0.99,
        seed: int = 0,
    ):
        self.module = policy
        self.critic = critic.eval().requires_grad_(False)
        self.windows = windows
        self.chain = resolve_chain(policy, chain, logprob, int(policy.config.n_action_steps))
        self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)  # the first K - K' steps
        self.obs_keys = tuple(policy.config.obs_shapes)
        self.n_windows, self.update_epochs, self.n_minibatches = int(n_windows), update_epochs, n_minibatches
        self.clip, self.gamma_denoise, self.seed = float(clip), float(gamma_denoise), int(seed)
        self.round, self.pos = 0, 0
        self.buffer: dict[str, Tensor] | None = None
        self.last_stats: dict[str, float] = {}

    @property
    def steps_per_round(self) -> int:
        return self.update_epochs * self.n_minibatches

    @torch.no_grad()
    def _fill(self) -> None:
        actor = self.module
        was = actor.training
        actor.eval()
        try:
            n = len(self.windows)
            idx = S.batch_indices(self.seed + 7, self.round, n, min(self.n_windows, n))
            raw = make_batch(self.windows, idx)
            obs = {k: raw[k].to(actor.device) for k in self.obs_keys}
            gen = torch.Generator(device=actor.device).manual_seed(self.seed * 1_000_003 + self.round)
            x0, rec = sample_chain(actor, self.frozen, self.chain, actor.encode(obs), gen)
            s = flat_obs(obs, self.obs_keys)
            adv = self.critic.advantage(s, x0.flatten(1))
        finally:
            actor.train(was)
        if not bool(torch.isfinite(adv).all() and torch.isfinite(rec["logp"]).all()):
            raise NonFiniteRL(
                f"offline PPO round {self.round}: advantages or log-probabilities hold NaN/inf; stopped, "
                "checkpoints/last is the last good checkpoint (lower rl100.ppo_lr, raise chain.min_std)"
            )
        self.buffer = {k: v.cpu() for k, v in obs.items()}
        self.buffer.update({k: rec[k].cpu() for k in ("x_t", "x_next", "logp", "t", "t_next")})
        self.buffer["adv"] = normalize_advantages(adv.cpu())
        self.last_stats = {"adv_raw_mean": float(adv.mean()), "adv_raw_std": float(adv.std())}

    def batch(self, step: int) -> dict[str, Tensor]:
        if self.buffer is None or self.pos >= self.steps_per_round:
            if self.buffer is not None:
                self.round += 1
            self.pos = 0
            self._fill()
        mb = minibatch(self.buffer, self.pos, self.n_minibatches, self.seed * 7919 + self.round * 101)
        self.pos += 1
        return mb

    def loss(self, mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        actor = self.module
        cond = actor.encode({k: mb[k] for k in self.obs_keys})
        logp = rescore(actor, self.chain, cond, mb)
        if not bool(torch.isfinite(logp).all()):
            raise NonFiniteRL(
                f"re-scored log-probabilities hold NaN/inf in offline PPO round {self.round}; stopped, "
                "checkpoints/last is the last good checkpoint"
            )
        loss, st = ppo_clip_loss(logp, mb["logp"], mb["adv"], self.clip, self.gamma_denoise)
        return loss, {**st, **self.last_stats}

    def extra_state(self) -> dict[str, Tensor]:
        out = {"counters": torch.tensor([self.round, self.pos])}
        if self.buffer is not None:
            out.update({f"buffer/{k}": v.contiguous() for k, v in self.buffer.items()})
        return out

    def load_extra_state(self, tensors: dict[str, Tensor], where: Path) -> None:
        if "counters" not in tensors:
            raise VlaflowError(f"{where}: no offline-PPO state (objective/counters)")
        self.round, self.pos = (int(v) for v in tensors["counters"].tolist())
        buf = {k[len("buffer/") :]: v for k, v in tensors.items() if k.startswith("buffer/")}
        self.buffer = buf or None
