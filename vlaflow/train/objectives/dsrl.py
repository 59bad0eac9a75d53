"""DSRL as an objective of the one training loop: SAC on the initial noise of a frozen denoiser.

One *round*: N envs reset with training seeds (0..99,999), full episodes with the noise actor choosing
each chunk's initial noise (sampled, for exploration) and the frozen policy denoising it with its own
deterministic sampler; every alive decision ``(obs features, w, chunk reward, next obs features, done)``
joins a replay buffer. Then ``updates_per_round`` loop steps, each one SAC update on a replay minibatch
(critic TD + actor + temperature; ``after_step`` moves the target critics). The replay buffer, target
critics and counters are the objective's state, so ``--resume`` continues after a kill.

What the checkpoint holds: a ``steered`` policy (:class:`vlaflow.policies.steered.model.SteeredPolicy`:
the frozen policy's config and weights + the noise actor), so ``vlaflow eval`` / ``load_policy`` run the
steered chain; the training state adds the whole SAC (``model/sac.*``), target critics and replay.
:class:`SteeredRuntime` runs the same pair in memory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlaflow.errors import ConfigError, VlaflowError
from vlaflow.interfaces import InferResult, obs_window
from vlaflow.policies.runtime import batch_of_one
from vlaflow.policies.steered.model import SteeredPolicy
from vlaflow.rl.dsrl import SAC, ReplayBuffer, polyak
from vlaflow.rl.returns import chunk_discount
from vlaflow.rl.rollout import ChunkVecEnv, obs_to_torch, train_seeds
from vlaflow.train.objective import Objective
from vlaflow.train.objectives.dppo import REWARDS


@dataclass(frozen=True)
class DSRLConfig:
    """DSRL's knobs (the paper's SAC defaults where it gives them; not yet tuned here)."""

    n_envs: int = 8  # envs per collection round
    n_decisions: int = 0  # decisions per episode (0 = the task's step limit / Ta)
    updates_per_round: int = 64  # SAC updates after each round
    batch_size: int = 256  # replay minibatch
    buffer: int = 100_000  # replay capacity (decisions)
    bound: float = 1.5  # |w| <= bound per noise dim (DSRL: 1.5)
    gamma: float = 0.99  # per env step; per decision gamma^Ta
    tau: float = 0.005  # target-critic Polyak rate
    init_alpha: float = 0.1  # initial entropy temperature (learned toward -Dw entropy)
    width: int = 256  # actor / critic MLP width
    critic_lr_scale: float = 3.0  # critic (and temperature) lr = lr x this
    seed_offset: int = 50_000  # first training seed (DPPO starts at 0: disjoint by default)
    # "task": the env's per-step reward summed per chunk; "success": 1 at the decision where the episode
    # succeeds. PushT ends an episode at success, so the summed task reward of an episode that stops at
    # 0.94 coverage and keeps pushing exceeds that of one that succeeds early: "task" pays for near-misses
    reward: str = "task"
    reward_offset: float = 0.0  # subtracted from every stored reward (DSRL's robomimic: 1, i.e. -1 per step)
    target_entropy_per_dim: float = -1.0  # SAC's target entropy / Dw (DSRL's configs: 0.0)
    critic_layer_norm: bool = True  # LayerNorm in the twin critics (DSRL's use_layer_norm)

    def __post_init__(self):
        for name in ("n_envs", "updates_per_round", "batch_size", "buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dsrl.{name} must be >= 1, got {getattr(self, name)}")
        if self.bound <= 0:
            raise ConfigError(f"dsrl.bound must be > 0, got {self.bound}")
        if self.reward not in REWARDS:
            raise ConfigError(f"dsrl.reward must be one of {REWARDS}, got {self.reward!r}")


class SteeredRuntime:
    """``infer`` of the frozen policy with the noise actor's deterministic noise (the DSRL policy)."""

    def __init__(self, policy, actor):
        self.policy, self.actor = policy.eval(), actor.eval()

    @property
    def config(self):
        return self.policy.spec

    def reset(self, seed: int | None = None) -> None:
        pass

    @torch.no_grad()
    def infer(self, obs: dict[str, Any], *, shift=None, delay=None) -> InferResult:
        batch = batch_of_one(obs_window(self.config, obs), self.policy.device)
        cond = self.policy.encode(batch)
        w, _ = self.actor(cond.flatten(1), deterministic=True)
        res = self.policy.denoise(cond, noise=w.view(1, *self.policy.target_shape))
        acts = self.policy.unnormalize_target(res.x0)[0].float().cpu().numpy()
        return InferResult(actions=acts, nfe=res.nfe)


class DSRLObjective(Objective):
    prefetch = "none"

    def __init__(self, policy: nn.Module, venv: ChunkVecEnv, cfg: DSRLConfig, *, seed: int = 0):
        self.cfg, self.venv, self.seed = cfg, venv, int(seed)
        self.policy = policy.eval().requires_grad_(False)
        if not hasattr(policy, "denoise"):
            raise VlaflowError(f"DSRL steers a denoising policy's noise; {type(policy).__name__} has none")
        obs_dim = policy.n_cond_tokens * policy.cond_dim
        self.noise_dim = int(np.prod(policy.target_shape))
        torch.manual_seed(self.seed)
        self.module = nn.ModuleDict(
            {
                "sac": SAC(
                    obs_dim,
                    self.noise_dim,
                    cfg.bound,
                    cfg.width,
                    cfg.init_alpha,
                    cfg.target_entropy_per_dim,
                    cfg.critic_layer_norm,
                )  # fmt: skip
            }
        )
        self.target_q = copy.deepcopy(self.module["sac"].q).requires_grad_(False)
        self.replay = ReplayBuffer(cfg.buffer)
        self.ta = int(policy.config.n_action_steps)
        max_steps = int(getattr(venv, "max_steps", 0) or 300)
        self.n_decisions = cfg.n_decisions or math.ceil(max_steps / self.ta)
        self.round, self.pos, self.env_steps = 0, 0, 0
        self.collected = False
        self.last_stats: dict[str, float] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        sac = self.module["sac"]
        return [
            {"params": list(sac.actor.parameters())},
            {"params": [*sac.q.parameters(), sac.log_alpha], "lr_scale": self.cfg.critic_lr_scale},
        ]

    def deploy(self, module: nn.Module) -> nn.Module:
        return SteeredPolicy.wrap(self.policy, module["sac"].actor, self.cfg.width)

    def steered(self) -> SteeredRuntime:
        return SteeredRuntime(self.policy, self.module["sac"].actor)

    @torch.no_grad()
    def _collect(self) -> None:
        pol, actor = self.policy, self.module["sac"].actor
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.round)
        steps0 = getattr(self.venv, "env_steps", 0)
        obs = self.venv.reset(train_seeds(self.round, self.cfg.n_envs, self.cfg.seed_offset))
        n = self.cfg.n_envs
        alive = np.ones(n, bool)
        feat = pol.encode(obs_to_torch(obs, pol.device)).flatten(1)
        ret, succ = np.zeros(n), np.zeros(n, bool)
        for _ in range(self.n_decisions):
            w, _ = actor(feat, generator=gen)
            res = pol.denoise(
                feat.view(n, pol.n_cond_tokens, pol.cond_dim), noise=w.view(n, *pol.target_shape)
            )
            acts = pol.unnormalize_target(res.x0)[:, : self.ta].cpu().numpy()
            obs, reward, done, success = self.venv.step(acts)
            nfeat = pol.encode(obs_to_torch(obs, pol.device)).flatten(1)
            keep = torch.from_numpy(alive)
            learn, terminal = reward, done
            if self.cfg.reward == "success":
                # alive and succeeded now = the first success, which ends the episode: the one true terminal.
                # The step limit only truncates (the TD target bootstraps through it)
                learn = (np.asarray(success, bool) & alive).astype(np.float64)
                terminal = np.asarray(success, bool)
            learn = learn - self.cfg.reward_offset
            if keep.any():
                self.replay.add(
                    obs=feat[keep],
                    w=w[keep],
                    reward=torch.from_numpy(learn.astype(np.float32))[keep],
                    next_obs=nfeat[keep],
                    done=torch.from_numpy(terminal)[keep],
                )
            ret += np.where(alive, reward, 0.0)
            succ |= success & alive
            alive &= ~done
            feat = nfeat
            if not alive.any():
                break
        self.env_steps += getattr(self.venv, "env_steps", 0) - steps0
        self.last_stats = {
            "rollout_success": float(succ.mean()),
            "rollout_return": float(ret.mean()),
            "env_steps": float(self.env_steps),
        }

    def batch(self, step: int) -> dict[str, Tensor]:
        if not self.collected or self.pos >= self.cfg.updates_per_round:
            if self.collected:
                self.round += 1
            self.pos = 0
            self._collect()
            self.collected = True
        self.pos += 1
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        return self.replay.sample(self.cfg.batch_size, g)

    def loss(self, b: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        gamma = chunk_discount(self.cfg.gamma, self.ta)
        loss, st = self.module["sac"].losses(
            self.target_q, b["obs"], b["w"], b["reward"], b["next_obs"], b["done"], gamma
        )
        return loss, {**st, **self.last_stats}

    def after_step(self, step: int) -> None:
        polyak(self.target_q, self.module["sac"].q, self.cfg.tau)

    def progress(self) -> dict[str, str]:
        s = self.last_stats
        if not s:
            return {}
        return {
            "env_steps": f"{int(s['env_steps'])}",
            "success": f"{s['rollout_success']:.2f}",
            "return": f"{s['rollout_return']:.1f}",
        }

    def extra_state(self) -> dict[str, Tensor]:
        out = {
            "counters": torch.tensor([self.round, self.pos, self.env_steps, int(self.collected)]),
            **{f"target_q/{k}": v for k, v in self.target_q.state_dict().items()},
        }
        if self.replay.n:
            out.update(self.replay.state())
        return out

    def load_extra_state(self, tensors: dict[str, Tensor], where: Path) -> None:
        if "counters" not in tensors:
            raise VlaflowError(f"{where}: no DSRL state (objective/counters); not a `vlaflow refine` run")
        self.round, self.pos, self.env_steps, collected = (int(v) for v in tensors["counters"].tolist())
        self.collected = bool(collected)
        tq = {k[len("target_q/") :]: v for k, v in tensors.items() if k.startswith("target_q/")}
        self.target_q.load_state_dict(tq)
        if "replay_meta" in tensors:
            self.replay.load(tensors)
