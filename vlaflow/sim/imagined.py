"""Imagined tasks: a frozen world model behind the sim task interface, so the evaluation harness (and every
``vlaflow eval`` option) runs a policy in imagination (``vlaflow eval --task wm:WM_CKPT ...``).

:class:`ImaginedTaskEnv` is a one-episode gymnasium-style env like the sim's tasks (``reset(seed)``,
``step(action)`` with ``info["success"]``, ``task_spec``, ``render()``, ``episode_metrics()``). It is the
world model's task (``WorldModelConfig.task``) seen through :class:`vlaflow.world_models.env.
WorldModelEnv` (one imagined episode): ``reset(seed=s)`` resets the *real* task env with seed ``s`` and
starts imagining from its observation (so the seeds mean the same starts as in the real evaluation); every
``step`` is one model call (a model predicting Tf > 1 steps per call is refused: the harness steps one
action at a time). The reward is the task's own from the predicted state (``coverage``) or the world
model's success classifier (``classifier``); by default the one its checkpoint records
(:func:`vlaflow.world_models.checkpoint.imagined_reward`).

An imagined step that is NaN or leaves the training data's range by ``range_margin`` ends the episode
(``truncated``, ``info["invalid"]``); ``episode_metrics()`` carries ``imagined_invalid`` (0 / 1) and the
sampler spread, so the report counts invalid episodes (``report["imagined"]["n_invalid_episodes"]``).
``task_spec`` is the real task's, with only the world model's observation key (a policy reading other
keys is refused by :func:`vlaflow.sim.policies.check_compatible`, which lists what the world model has) and
``extra["imagined"]`` describing the model. ``render()`` draws the scene of the predicted state with the real
task's own renderer (PushT: the state placed in the real env and drawn; tasks without a state renderer
return None, so no video).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vlaflow.errors import VlaflowError
from vlaflow.sim.tasks import WM_PREFIX, make_env
from vlaflow.world_models.checkpoint import imagined_reward, load_world_model
from vlaflow.world_models.env import WorldModelEnv


def _render_pusht_state(env, state: np.ndarray) -> np.ndarray:
    env.reset(options={"reset_to_state": np.asarray(state, np.float64)})
    return env.render()


# task -> draw(real env, state) -> frame: the task's own renderer fed a predicted state
STATE_RENDERERS = {"pusht": _render_pusht_state}


class ImaginedTaskEnv:
    """One imagined episode at a time of the world model at ``checkpoint``; see the module doc."""

    def __init__(
        self,
        checkpoint: str,
        obs_mode: str = "lowdim",
        render_size: int | None = None,
        *,
        task: str | None = None,
        reward: str | None = None,
        n_samples: int = 1,
        range_margin: float = 0.1,
        device: str = "cpu",
        **real_kwargs,
    ):
        self.checkpoint = str(checkpoint)
        wm = load_world_model(checkpoint, device=device)
        cfg = wm.config
        if not cfg.task:
            raise VlaflowError(f"world model {checkpoint} records no task; it cannot be imagined as one")
        if task is not None and task != cfg.task:
            raise VlaflowError(f"world model {checkpoint} was trained on task {cfg.task!r}, not {task!r}")
        if obs_mode != "lowdim":
            raise VlaflowError(
                f"world model {checkpoint} predicts {cfg.obs_key!r} {(cfg.obs_dim,)} only (low-dim): "
                f"obs mode {obs_mode!r} is not available in imagination"
            )
        if cfg.n_future != 1:
            raise VlaflowError(
                f"world model {checkpoint} predicts {cfg.n_future} steps per call; evaluation steps one "
                "action at a time, so it needs a model with n_future = 1"
            )
        self.real = make_env(cfg.task, obs_mode="lowdim", **real_kwargs)  # starts and drawing only
        spec = self.real.task_spec
        if tuple(spec.obs_shapes.get(cfg.obs_key, ())) != (cfg.obs_dim,) or spec.action_dim != cfg.action_dim:
            self.real.close()
            raise VlaflowError(
                f"world model {checkpoint} has {cfg.obs_key!r} {(cfg.obs_dim,)} and action dim "
                f"{cfg.action_dim}; its task {cfg.task!r} gives {cfg.obs_key!r} "
                f"{spec.obs_shapes.get(cfg.obs_key)} and action dim {spec.action_dim}"
            )
        self.reward_name, reward_fn = imagined_reward(checkpoint, cfg.task, reward)
        self.venv = WorldModelEnv(
            wm,
            np.zeros((1, cfg.obs_dim), np.float32),
            n_envs=1,
            n_obs_steps=1,
            reward_fn=reward_fn,
            max_steps=spec.max_steps,
            n_samples=n_samples,
            range_margin=range_margin,
            terminate_on_success=True,
        )
        self.obs_key = cfg.obs_key
        self.imagined = {
            "world_model": self.checkpoint,
            "task": cfg.task,
            "reward": self.reward_name,
            "n_samples": n_samples,
            "range_margin": range_margin,
            "num_inference_steps": cfg.num_inference_steps,
            "starts": f"real {cfg.task} env resets with the episode seeds",
        }
        self.task_spec = dataclasses.replace(
            spec,
            obs_shapes={cfg.obs_key: (cfg.obs_dim,)},
            obs_dtypes={cfg.obs_key: "float32"},
            extra={**spec.extra, "imagined": self.imagined},
        )
        self.real_resets = 0  # real env resets (starts); the real env is never stepped
        self._unc: list[float] = []
        self._state = np.zeros(cfg.obs_dim, np.float32)

    @property
    def state(self) -> np.ndarray:
        """The current imagined (or start) observation (Do,)."""
        return self._state.copy()

    def reset(self, seed: int | None = None, options: dict | None = None):
        start = (options or {}).get("reset_to_state")
        if start is None:
            real_obs, _ = self.real.reset(seed=seed)
            self.real_resets += 1
            start = real_obs[self.obs_key]
        obs = self.venv.reset([0], starts=np.asarray(start, np.float32)[None], noise_seed=seed or 0)
        self._state = obs[self.obs_key][0, -1]
        self._unc = []
        return {self.obs_key: self._state.copy()}, {"success": False, "imagined": True}

    def step(self, action):
        action = np.asarray(action, np.float32).reshape(1, 1, -1)
        obs, reward, done, success = self.venv.step(action)
        info = self.venv.last_info
        self._state = obs[self.obs_key][0, -1]
        self._unc.append(float(info["uncertainty"][0]))
        invalid = bool(info["invalid"][0])
        info_out = {"success": bool(success[0]), "invalid": invalid, "uncertainty": self._unc[-1]}
        terminated = bool(success[0])
        truncated = bool(done[0]) and not terminated
        return {self.obs_key: self._state.copy()}, float(reward[0]), terminated, truncated, info_out

    def render(self):
        draw = STATE_RENDERERS.get(self.imagined["task"])
        return None if draw is None else draw(self.real, self._state)

    def episode_metrics(self) -> dict[str, float]:
        return {
            "imagined_invalid": float(self.venv.invalid[0]),
            "imagined_uncertainty": float(np.mean(self._unc)) if self._unc else 0.0,
        }

    def close(self) -> None:
        self.real.close()


def make_imagined(
    name: str, obs_mode: str = "lowdim", render_size: int | None = None, **kw
) -> ImaginedTaskEnv:
    """``wm:CHECKPOINT`` -> the imagined task env of that world-model checkpoint."""
    ckpt = name[len(WM_PREFIX) :]
    if not (Path(ckpt) / "config.json").is_file():
        raise VlaflowError(
            f"--task {name}: {ckpt} is not a world-model checkpoint directory (no config.json)"
        )
    return ImaginedTaskEnv(ckpt, obs_mode, render_size, **kw)
