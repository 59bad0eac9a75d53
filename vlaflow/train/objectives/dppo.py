"""DPPO: online PPO over the denoising chain (arXiv 2409.00588), an objective of the one training loop.

One *iteration*: N envs are reset with fresh training seeds (0..99,999; never an evaluation seed) and
rolled out for T decisions (one decision = one chunk, Ta env steps executed; reward summed over them,
discount gamma^Ta per decision) with the chain's last K' denoising steps recorded (:mod:`vlaflow.rl.chain`);
GAE over decisions with the value net's estimates; then ``update_epochs`` passes over the alive
transitions in ``n_minibatches`` minibatches each. One loop step = one minibatch update: the recorded
steps re-scored under the current weights, PPO-clip per denoising step (denoising discount
``gamma_denoise``), value loss, and optionally a behaviour-cloning term on demonstration windows.

``module`` = ``ModuleDict(actor=policy, value=ValueNet[, noise=NoiseScale])``; the checkpoint deploys the
actor, a normal policy checkpoint. The current iteration's rollout buffer, its position and the counters
are the objective's state (``extra_state``), so a run killed anywhere resumes from ``checkpoints/last``.
Non-finite advantages or log-probabilities stop the run with a message (the last good checkpoint stays).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.rl.chain import LOGPROBS, ChainConfig, NoiseScale, rescore, resolve_chain
from vlaflow.rl.iql import mlp
from vlaflow.rl.ppo import normalize_advantages, ppo_clip_loss, value_loss
from vlaflow.rl.returns import chunk_discount, discounted_returns_to_date, gae, merge_moments
from vlaflow.rl.rollout import ChunkVecEnv, collect, episode_stats, train_seeds
from vlaflow.train.objective import Objective

REWARDS = ("task", "success")


def success_rewards(success: Tensor) -> Tensor:
    """(T, N) success-so-far flags -> (T, N) sparse rewards: 1 at the decision where success first holds."""
    before = torch.zeros_like(success[:1])
    return (success & ~torch.cat([before, success[:-1]])).float()


class NonFiniteRL(VlaflowError):
    """NaN/inf in advantages or log-probabilities; the run stops, checkpoints/last stays the last good one."""


@dataclass(frozen=True)
class DPPOConfig:
    """DPPO's knobs (defaults: the paper's robomimic settings scaled to this machine; not yet tuned here)."""

    n_envs: int = 8  # parallel envs per iteration (paper: 40-50)
    n_decisions: int = 0  # decisions per rollout (0 = enough chunks for the task's step limit)
    update_epochs: int = 5  # passes over each rollout (paper: 5-10)
    n_minibatches: int = 4  # minibatches per pass (fixed count: every iteration is the same number of steps)
    gamma: float = 0.999  # per env step; a decision discounts gamma^Ta (paper: 0.999)
    gae_lambda: float = 0.95  # GAE lambda (paper: 0.95)
    clip: float = 0.01  # PPO ratio clip (paper: 0.01 for the denoising steps)
    gamma_denoise: float = 0.99  # denoising discount: step k of K' weighs gamma_denoise^(K'-1-k)
    vf_coef: float = 0.5  # value-loss weight
    critic_lr_scale: float = 10.0  # value net lr = lr x this (paper: actor 1e-4, critic 1e-3)
    value_width: int = 256  # value MLP width (2 hidden layers, Mish) on the detached obs encoding
    reward_scale: float = 1.0  # multiplies chunk rewards before GAE
    # divide rewards by a running std of the discounted return (DPPO's reward_scale_running): value
    # targets stay O(1), so the critic's gradients do not dominate the shared gradient-norm clip
    reward_norm: bool = True
    bc_coef: float = 0.0  # weight of a behaviour-cloning term on demo windows (needs --data)
    target_kl: float = 0.0  # skip the rest of an iteration's updates above this approx KL (0 = never)
    seed_offset: int = 0  # first training seed of iteration 0 (seeds wrap inside 0..99,999)
    # how a denoising step is scored: "mean_executed" (mean per-dim log-density over the Ta executed
    # actions) or "sum" (over the whole H x Da chunk: the exact density, whose PPO ratio moved so much
    # per update that clip=0.01 clipped nearly every sample; see rl/README.md)
    logprob: str = "mean_executed"
    reward: str = "task"  # "task": the env's per-step reward summed per chunk; "success": 1 when it succeeds
    chain: ChainConfig = field(default_factory=ChainConfig)  # how the chain samples (K', min_std, ...)

    def __post_init__(self):
        for name in ("n_envs", "update_epochs", "n_minibatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dppo.{name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and 0 < self.gamma_denoise <= 1):
            raise ConfigError(
                f"dppo.gamma / gae_lambda / gamma_denoise must be in (0, 1], got "
                f"{self.gamma} / {self.gae_lambda} / {self.gamma_denoise}"
            )
        if self.clip <= 0:
            raise ConfigError(f"dppo.clip must be > 0, got {self.clip}")
        if self.logprob not in LOGPROBS:
            raise ConfigError(f"dppo.logprob must be one of {LOGPROBS}, got {self.logprob!r}")
        if self.reward not in REWARDS:
            raise ConfigError(f"dppo.reward must be one of {REWARDS}, got {self.reward!r}")

    @property
    def steps_per_iteration(self) -> int:
        return self.update_epochs * self.n_minibatches


class ValueNet(nn.Module):
    """V(obs window) on the actor's observation encoding (detached: the critic does not train the encoder)."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.net = mlp(in_dim, 1, width, 2)

    def forward(self, cond: Tensor) -> Tensor:  # (B, Nc, Fc) -> (B,)
        return self.net(cond.detach().flatten(1)).squeeze(-1)


_BUFFER_KEYS = ("x_t", "x_next", "logp", "adv", "ret")


def minibatch(buffer: dict[str, Tensor], j: int, n_minibatches: int, seed: int) -> dict[str, Tensor]:
    """Minibatch ``j`` of a PPO buffer: pass ``j // n_minibatches`` is a permutation seeded by (seed, pass),
    cut in ``n_minibatches`` parts; the chain's times ``t`` / ``t_next`` (K',) are shared by every row."""
    n = len(buffer["adv"])
    epoch, part = divmod(j, n_minibatches)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    size = math.ceil(n / n_minibatches)
    idx = perm[part * size : (part + 1) * size]
    if len(idx) == 0:
        idx = perm[:size]
    mb = {k: v[idx] for k, v in buffer.items() if k not in ("t", "t_next")}
    mb["t"], mb["t_next"] = buffer["t"], buffer["t_next"]
    return mb


class DPPO(Objective):
    prefetch = "none"  # rollouts need this very step's weights

    def __init__(
        self,
        policy: nn.Module,
        venv: ChunkVecEnv,
        cfg: DPPOConfig,
        *,
        seed: int = 0,
        bc_batch: Callable[[int], dict] | None = None,
    ):
        self.cfg, self.venv, self.seed, self.bc_batch = cfg, venv, int(seed), bc_batch
        if cfg.bc_coef > 0 and bc_batch is None:
            raise ConfigError("dppo.bc_coef > 0 needs demonstration windows (--data STORE)")
        self.chain = resolve_chain(policy, cfg.chain, cfg.logprob, int(policy.config.n_action_steps))
        self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)  # the first K - K' steps
        modules: dict[str, nn.Module] = {"actor": policy}
        cond_dim = policy.n_cond_tokens * policy.cond_dim
        torch.manual_seed(self.seed)
        modules["value"] = ValueNet(cond_dim, cfg.value_width)
        if self.chain.flow and self.chain.learned_std:
            modules["noise"] = NoiseScale(cfg.chain.noise_std, policy.config.action_dim)
        self.module = nn.ModuleDict(modules)
        self.obs_keys = tuple(policy.config.obs_shapes)
        self.ta = int(policy.config.n_action_steps)
        max_steps = int(getattr(venv, "max_steps", 0) or 300)
        self.n_decisions = cfg.n_decisions or math.ceil(max_steps / self.ta)
        # state (extra_state): iteration, position in its update queue, counters, the rollout buffer
        self.iteration, self.pos, self.env_steps = 0, 0, 0
        self.ret_stats = torch.zeros(3, dtype=torch.float64)  # running (count, mean, M2) of returns
        self.buffer: dict[str, Tensor] | None = None
        self.last_stats: dict[str, float] = {}
        self.skip_rest = False

    # -- parameters -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        m = self.module
        actor = [p for p in m["actor"].parameters() if p.requires_grad]
        if "noise" in m:
            actor += list(m["noise"].parameters())
        return [
            {"params": actor},
            {"params": list(m["value"].parameters()), "lr_scale": self.cfg.critic_lr_scale},
        ]

    def deploy(self, module: nn.Module) -> nn.Module:
        return module["actor"]

    def _noise(self) -> NoiseScale | None:
        return self.module["noise"] if "noise" in self.module else None

    # -- rollouts -------------------------------------------------------------------------------------
    def _collect(self) -> None:
        c, actor, value = self.cfg, self.module["actor"], self.module["value"]
        was = actor.training
        actor.eval()
        gen = torch.Generator(device=actor.device).manual_seed(self.seed * 1_000_003 + self.iteration)
        steps0 = getattr(self.venv, "env_steps", 0)
        try:
            roll = collect(
                actor,
                self.frozen,
                self.chain,
                self.venv,
                train_seeds(self.iteration, c.n_envs, c.seed_offset),
                self.n_decisions,
                self.ta,
                gen,
                value_fn=lambda ob: value(actor.encode(ob)),
                noise_scale=self._noise(),
            )
        finally:
            actor.train(was)
        self.env_steps += getattr(self.venv, "env_steps", 0) - steps0
        gamma = chunk_discount(c.gamma, self.ta)
        base = roll["reward"] if c.reward == "task" else success_rewards(roll["success"]) * roll["alive"]
        rewards = base * c.reward_scale
        if c.reward_norm:
            rewards = rewards / self._return_std(rewards, roll["done"], roll["alive"], gamma)
        adv, ret = gae(
            rewards,
            roll["value"],
            roll["last_value"],
            roll["done"],
            gamma,
            c.gae_lambda,
        )
        alive = roll["alive"]
        if not bool(torch.isfinite(adv[alive]).all()):
            raise NonFiniteRL(
                f"the advantages of rollout iteration {self.iteration} hold NaN/inf (values or rewards "
                "are not finite); training stopped, checkpoints/last is the last good checkpoint. Lower "
                "the lr or dppo.reward_scale"
            )
        if not bool(torch.isfinite(roll["logp"][alive]).all()):
            raise NonFiniteRL(
                f"the recorded log-probabilities of rollout iteration {self.iteration} hold NaN/inf; "
                "training stopped, checkpoints/last is the last good checkpoint (raise chain.min_std / "
                "noise_std)"
            )
        buf = {k: roll[k][alive] for k in ("x_t", "x_next", "logp", *self.obs_keys)}
        buf["adv"] = normalize_advantages(adv[alive])
        buf["ret"] = ret[alive]
        buf["t"], buf["t_next"] = roll["t"], roll["t_next"]
        self.buffer = buf
        self.last_stats = {**episode_stats(roll), "env_steps": float(self.env_steps)}
        self.skip_rest = False

    def _return_std(self, rewards: Tensor, dones: Tensor, alive: Tensor, gamma: float) -> float:
        """Merge this rollout's discounted returns-to-date into the running moments; their std."""
        g = discounted_returns_to_date(rewards, dones, gamma)
        self.ret_stats = merge_moments(self.ret_stats, g[alive])
        n, _, m2 = self.ret_stats.tolist()
        return max(math.sqrt(m2 / n), 1e-2)

    def _minibatch(self, j: int) -> dict[str, Tensor]:
        return minibatch(self.buffer, j, self.cfg.n_minibatches, self.seed * 7919 + self.iteration * 101)

    def batch(self, step: int) -> dict[str, Any]:
        spi = self.cfg.steps_per_iteration
        if self.buffer is None or self.pos >= spi:
            if self.buffer is not None:
                self.iteration += 1
            self.pos = 0
            self._collect()
        mb = self._minibatch(self.pos)
        self.pos += 1
        if self.bc_batch is not None and self.cfg.bc_coef > 0:
            mb["bc"] = self.bc_batch(step)
        return mb

    # -- the update -----------------------------------------------------------------------------------
    def loss(self, mb: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        c, actor = self.cfg, self.module["actor"]
        cond = actor.encode({k: mb[k] for k in self.obs_keys})
        logp = rescore(actor, self.chain, cond, mb, self._noise())
        if not bool(torch.isfinite(logp).all()):
            raise NonFiniteRL(
                f"re-scored log-probabilities hold NaN/inf at iteration {self.iteration}; training stopped, "
                "checkpoints/last is the last good checkpoint (lower the lr, raise chain.min_std)"
            )
        pg, st = ppo_clip_loss(logp, mb["logp"], mb["adv"], c.clip, c.gamma_denoise)
        if self.skip_rest:  # above target KL: no policy step for the rest of this iteration
            pg = pg * 0.0
        vl = value_loss(self.module["value"](cond), mb["ret"])
        total = pg + c.vf_coef * vl
        metrics = {"pg_loss": pg.detach(), "v_loss": vl.detach(), **st, **self.last_stats}
        if "bc" in mb:
            bc, _ = actor.compute_loss(mb["bc"])
            total = total + c.bc_coef * bc
            metrics["bc_loss"] = bc.detach()
        if c.target_kl > 0 and float(st["approx_kl"]) > c.target_kl:
            self.skip_rest = True
        return total, metrics

    def progress(self) -> dict[str, str]:
        s = self.last_stats
        if not s:
            return {}
        return {
            "env_steps": f"{int(s['env_steps'])}",
            "success": f"{s['rollout_success']:.2f}",
            "return": f"{s['rollout_return']:.1f}",
        }

    # -- resume ---------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Tensor]:
        out = {
            "counters": torch.tensor([self.iteration, self.pos, self.env_steps, int(self.skip_rest)]),
            "return_stats": self.ret_stats.clone(),
            "stats": torch.tensor(
                [self.last_stats.get(k, math.nan) for k in ("rollout_success", "rollout_return")]
            ),
        }
        if self.buffer is not None:
            out.update({f"buffer/{k}": v.contiguous() for k, v in self.buffer.items()})
        return out

    def load_extra_state(self, tensors: dict[str, Tensor], where: Path) -> None:
        if "counters" not in tensors:
            raise VlaflowError(f"{where}: no DPPO state (objective/counters); not a `vlaflow refine` run")
        it, pos, env_steps, skip = (int(v) for v in tensors["counters"].tolist())
        self.iteration, self.pos, self.env_steps, self.skip_rest = it, pos, env_steps, bool(skip)
        self.ret_stats = tensors["return_stats"].clone()
        buf = {k[len("buffer/") :]: v for k, v in tensors.items() if k.startswith("buffer/")}
        self.buffer = buf or None
        succ, ret = tensors["stats"].tolist()
        if not math.isnan(succ):
            self.last_stats = {
                "rollout_success": succ,
                "rollout_return": ret,
                "env_steps": float(env_steps),
            }
