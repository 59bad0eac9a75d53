"""EBT-Policy config: an energy transformer over [obs tokens ; action tokens], actions by gradient descent."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from vlaflow.policies.base_config import NetConfig, PolicyConfig, _check


@dataclass(frozen=True)
class EBTConfig(PolicyConfig):
    family: str = "ebt"  # registry name (fixed)
    net: NetConfig = field(default_factory=lambda: NetConfig(kind="transformer"))  # unused; EBT's net below
    sampler: str = "descent"  # "descent" (fixed step count) | "descent_es" (energy-based early stopping)
    num_inference_steps: int = 2  # descent steps at inference (the cap when early stopping)
    d_model: int = 128  # energy transformer token width
    n_layers: int = 3  # energy transformer blocks
    n_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = d_model * mlp_ratio
    alpha_init: float = 1.0  # initial descent step size alpha = softplus(raw); learned, always > 0
    init_std: float = 1.0  # std of the Gaussian starting chunk (normalized action units)
    clip_actions: float = 1.5  # clamp the chunk to [-c, c] after every step (0 = no clamp)
    train_steps_min: int = 2  # randomized unroll length in training: uniform in [min, max]
    train_steps_max: int = 4  # (the paper randomizes the step count as a regularizer)
    randomize_step_size: bool = True  # per-sample step size uniform in [alpha/2, 2 alpha] in training
    train_langevin_std: float = 0.01  # Langevin noise std added after each training step
    langevin_std: float = 0.0  # Langevin noise std at inference (0 = deterministic descent)
    replay_size: int = 1024  # chunks in the replay buffer of past predictions (0 = off)
    replay_prob: float = 0.25  # fraction of a training batch started from replayed predictions
    data_start_prob: float = 0.0  # fraction of a batch started from the expert chunk + noise (mode-seeking)
    data_start_std: float = 0.5  # max std of that noise (per sample uniform in [0, std])
    # fraction of a batch started from the expert chunk with its last s ~ U{1..Ta} actions replaced by the
    # one before them, plus noise U[0, shift_start_std]: the warm start the RTI runtime gives a later call
    # (the previous chunk shifted by the s steps executed since), so a 1-2 step descent re-plans the tail
    shift_start_prob: float = 0.0
    shift_start_std: float = 0.3
    # a token telling the energy the start's noise level (init_std for noise starts, the drawn std for
    # expert + noise and shifted starts, warm_level for replayed ones and for the RTI runtime's warm starts):
    # a time-free energy cannot tell a clean chunk from a noisy one and "denoises" a near-perfect warm
    # start away from the data (measured: from the shifted expert chunk, one step raised the error 50x)
    level_token: bool = False
    warm_level: float = 0.05  # the level a warm start (shifted previous chunk) is read at
    loss_on: str = "all"  # MSE to the expert chunk after "all" steps (mean) or only the "last"
    es_tol: float = 1e-3  # early stopping: stop a sample once its energy drops by less than this
    num_candidates: int = 1  # inference: candidates per observation, the lowest final energy is kept

    _SAMPLERS: typing.ClassVar[tuple[str, ...]] = ("descent", "descent_es")

    def __post_init__(self):
        _check(self.family == "ebt", f"EBTConfig.family must be 'ebt', got {self.family!r}")
        super().__post_init__()
        _check(
            self.d_model % self.n_heads == 0 and self.d_model >= 2,
            f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}",
        )
        _check(self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}")
        _check(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.alpha_init > 0, f"alpha_init must be > 0, got {self.alpha_init}")
        _check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        _check(self.clip_actions >= 0, f"clip_actions must be >= 0, got {self.clip_actions}")
        _check(
            1 <= self.train_steps_min <= self.train_steps_max,
            f"need 1 <= train_steps_min <= train_steps_max, got {self.train_steps_min}, "
            f"{self.train_steps_max}",
        )
        _check(
            self.train_langevin_std >= 0, f"train_langevin_std must be >= 0, not {self.train_langevin_std}"
        )
        _check(self.langevin_std >= 0, f"langevin_std must be >= 0, got {self.langevin_std}")
        _check(self.replay_size >= 0, f"replay_size must be >= 0, got {self.replay_size}")
        _check(0 <= self.replay_prob <= 1, f"replay_prob must be in [0, 1], got {self.replay_prob}")
        _check(0 <= self.data_start_prob <= 1, f"data_start_prob must be in [0, 1]: {self.data_start_prob}")
        _check(self.data_start_std >= 0, f"data_start_std must be >= 0, got {self.data_start_std}")
        _check(
            0 <= self.shift_start_prob <= 1 and self.data_start_prob + self.shift_start_prob <= 1,
            f"shift_start_prob must be in [0, 1 - data_start_prob], got {self.shift_start_prob} "
            f"(data_start_prob {self.data_start_prob})",
        )
        _check(self.shift_start_std >= 0, f"shift_start_std must be >= 0, got {self.shift_start_std}")
        _check(self.warm_level >= 0, f"warm_level must be >= 0, got {self.warm_level}")
        _check(self.loss_on in ("all", "last"), f"loss_on must be 'all' or 'last', got {self.loss_on!r}")
        _check(self.es_tol >= 0, f"es_tol must be >= 0, got {self.es_tol}")
        _check(self.num_candidates >= 1, f"num_candidates must be >= 1, got {self.num_candidates}")
