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
``task_spec`` is the real task's, with the world model's observation key and the task's keys that are
functions of it (:data:`DERIVED_KEYS`; PushT: ``obs.keypoint``, ``obs.agent_pos``); a policy reading any
other key is refused by :func:`vlaflow.sim.policies.check_compatible`, which lists what there is; and
``extra["imagined"]`` describing the model. ``render()`` draws the scene of the predicted state with the real
task's own renderer (PushT: the state placed in the real env and drawn; tasks without a state renderer
return None, so no video).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from vlaflow.deploy.sync_chunk import SyncChunkExecutor
from vlaflow.errors import VlaflowError
from vlaflow.sim.policies import build_policy, check_compatible, describe_policy, reset_policy
from vlaflow.sim.pusht import LOCAL_KEYPOINTS, keypoints_from_state
from vlaflow.sim.tasks import WM_PREFIX, make_env
from vlaflow.sim.video import write_mp4
from vlaflow.world_models.checkpoint import imagined_reward, load_world_model
from vlaflow.world_models.env import WorldModelEnv


def _render_pusht_state(env, state: np.ndarray, action: np.ndarray | None) -> np.ndarray:
    env.reset(options={"reset_to_state": np.asarray(state, np.float64)})
    env._last_action = None if action is None else np.asarray(action, np.float64)  # gym-pusht's target cross
    return env.render()


# task -> draw(real env, state, last action or None) -> frame: the task's own renderer fed a predicted state
STATE_RENDERERS = {"pusht": _render_pusht_state}


def _pusht_derived(state: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "obs.keypoint": keypoints_from_state(state).astype(np.float32),
        "obs.agent_pos": np.asarray(state[..., :2], np.float32),  # (..., 5) states, one or a batch
    }


def _pusht_state(obs: dict[str, np.ndarray]) -> np.ndarray:
    """PushT states (..., 5) back from ``obs.keypoint`` (..., 9, 2) and ``obs.agent_pos`` (..., 2): the block
    pose is the least-squares rigid fit of the T's local keypoints to the observed ones (exact on the sim's
    keypoints), the angle taken mod 2 pi as the sim's state has it."""
    kp = np.asarray(obs["obs.keypoint"], np.float64)
    p = kp - kp.mean(-2, keepdims=True)
    q = LOCAL_KEYPOINTS - LOCAL_KEYPOINTS.mean(0)
    sin = (q[:, 0] * p[..., 1] - q[:, 1] * p[..., 0]).sum(-1)
    cos = (q[:, 0] * p[..., 0] + q[:, 1] * p[..., 1]).sum(-1)
    ang = np.arctan2(sin, cos)
    c, s = np.cos(ang), np.sin(ang)
    m = LOCAL_KEYPOINTS.mean(0)
    xy = kp.mean(-2) - np.stack([c * m[0] - s * m[1], s * m[0] + c * m[1]], -1)
    agent = np.asarray(obs["obs.agent_pos"], np.float64)
    return np.concatenate([agent, xy, np.mod(ang, 2 * np.pi)[..., None]], -1).astype(np.float32)


# task -> state -> the task's other observation keys that are functions of the state (PushT: the block's
# keypoints and the agent position, as the sim computes them), so policies reading them run in imagination
DERIVED_KEYS = {"pusht": _pusht_derived}
# task -> those keys -> the state back (PushT: a rigid fit of the keypoints), so a model of the state can
# judge a policy that reads only derived keys from the policy's own observations (the RL-100 gate)
STATE_FROM_KEYS = {"pusht": _pusht_state}


def state_codec(task: str, obs_key: str, obs_dim: int, obs_shapes: dict):
    """For a world model of ``task`` predicting ``obs_key`` (``obs_dim``) and a policy reading exactly the
    task's derived keys ``obs_shapes``: ``(to_state, from_state)`` -- the policy's observations {key: (N,
    ...)} -> states (N, obs_dim) and back -- or None when the policy reads the model's own key (or the task
    has no inverse). A policy reading a key that is neither is refused, naming the keys there are."""
    if tuple(obs_shapes) == (obs_key,) or task not in STATE_FROM_KEYS or obs_key != "obs.state":
        return None
    _, derive = derived_keys(task, obs_key, obs_dim, obs_shapes)  # refuses a derived key of another shape
    have = sorted(DERIVED_KEYS[task](np.zeros(obs_dim, np.float32)))
    if sorted(obs_shapes) != have:  # (then derive is the task's, restricted to exactly these keys)
        raise VlaflowError(
            f"the policy reads {sorted(obs_shapes)}; a world model of {obs_key!r} judges policies reading "
            f"{obs_key!r} alone or all of the keys the state is recovered from: {have}"
        )
    return STATE_FROM_KEYS[task], derive


def derived_keys(task: str, obs_key: str, obs_dim: int, obs_shapes: dict) -> tuple[dict, object]:
    """For a world model of ``task`` predicting ``obs_key`` (``obs_dim``) and a policy reading ``obs_shapes``:
    (the policy's keys the model must predict itself, ``derive(states) -> {key: array}`` of the others or
    None). A derived key of another shape than the policy's is refused with both shapes."""
    derive = DERIVED_KEYS.get(task) if obs_key == "obs.state" else None
    shapes = {k: v.shape for k, v in derive(np.zeros(obs_dim, np.float32)).items()} if derive else {}
    for k, v in obs_shapes.items():
        if k in shapes and tuple(v) != tuple(shapes[k]):
            raise VlaflowError(
                f"the policy reads {k!r} {tuple(v)}; computed from the state it is {shapes[k]}"
            )
    used = [k for k in shapes if k in obs_shapes]
    own = {k: tuple(v) for k, v in obs_shapes.items() if k not in shapes} or {obs_key: (obs_dim,)}
    if not used:
        return own, None
    return own, lambda states: {k: v for k, v in derive(states).items() if k in used}


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
        self._derive = DERIVED_KEYS.get(cfg.task) if cfg.obs_key == "obs.state" else None
        derived = self._derive(np.zeros(cfg.obs_dim, np.float32)) if self._derive else {}
        keys = [cfg.obs_key, *derived]
        self.imagined = {
            "world_model": self.checkpoint,
            "task": cfg.task,
            "reward": self.reward_name,
            "n_samples": n_samples,
            "range_margin": range_margin,
            "num_inference_steps": cfg.num_inference_steps,
            "starts": f"real {cfg.task} env resets with the episode seeds",
            "keys": keys,
        }
        self.task_spec = dataclasses.replace(
            spec,
            obs_shapes={k: tuple(spec.obs_shapes[k]) for k in keys},
            obs_dtypes=dict.fromkeys(keys, "float32"),
            extra={**spec.extra, "imagined": self.imagined},
        )
        self.real_resets = 0  # real env resets (starts); the real env is never stepped
        self._unc: list[float] = []
        self._state = np.zeros(cfg.obs_dim, np.float32)
        self._action: np.ndarray | None = None

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
        self._unc, self._action = [], None
        return self._observation(), {"success": False, "imagined": True}

    def step(self, action):
        self._action = np.asarray(action, np.float32).reshape(-1)
        obs, reward, done, success = self.venv.step(self._action.reshape(1, 1, -1))
        info = self.venv.last_info
        self._state = obs[self.obs_key][0, -1]
        self._unc.append(float(info["uncertainty"][0]))
        invalid = bool(info["invalid"][0])
        info_out = {"success": bool(success[0]), "invalid": invalid, "uncertainty": self._unc[-1]}
        terminated = bool(success[0])
        truncated = bool(done[0]) and not terminated
        return self._observation(), float(reward[0]), terminated, truncated, info_out

    def _observation(self) -> dict[str, np.ndarray]:
        obs = {self.obs_key: self._state.copy()}
        return {**obs, **self._derive(self._state)} if self._derive else obs

    def render(self):
        draw = STATE_RENDERERS.get(self.imagined["task"])
        return None if draw is None else draw(self.real, self._state, self._action)

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


# ---------------------------------------------------------------------------------------------- pictures
# task -> named groups of state dims for the error plot: position groups are L2 in the state's units,
# angle groups the wrapped absolute error (rad)
ERROR_GROUPS = {"pusht": {"block_px": (2, 3), "angle_rad": (4,), "agent_px": (0, 1)}}


def _error_groups(task: str, obs_dim: int, angle_dims: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    if task in ERROR_GROUPS:
        return ERROR_GROUPS[task]
    groups = {"state_l2": tuple(d for d in range(obs_dim) if d not in angle_dims)}
    return {**groups, "angle_rad": tuple(angle_dims)} if angle_dims else groups


def state_errors(pred: np.ndarray, true: np.ndarray, groups: dict, angle_dims) -> dict[str, list[float]]:
    """Per step errors (T,) of predicted vs true states (T, Do) for each group of dims."""
    out = {}
    for name, dims in groups.items():
        d = pred[:, list(dims)] - true[:, list(dims)]
        if set(dims) <= set(angle_dims):
            out[name] = np.abs((d + np.pi) % (2 * np.pi) - np.pi).mean(1).tolist()
        else:
            out[name] = np.linalg.norm(d, axis=1).tolist()
    return out


def _rollout(env, policy, seed: int, max_steps: int) -> dict:
    """One closed-loop episode of ``policy`` in ``env`` (sim or imagined): states, actions, frames."""

    reset_policy(policy, seed)
    ex = SyncChunkExecutor(policy.infer, policy.config)
    obs, _ = env.reset(seed=seed)
    states, actions, frames = [obs["obs.state"]], [], [env.render()]
    success = invalid = False
    for t in range(max_steps):
        a = ex.act(obs, t)
        obs, _, terminated, truncated, info = env.step(a)
        states.append(obs["obs.state"])
        actions.append(np.asarray(a, np.float32))
        frames.append(env.render())
        success = success or bool(info.get("success"))
        invalid = invalid or bool(info.get("invalid"))
        if terminated or truncated:
            break
    return {
        "states": np.asarray(states, np.float64),
        "actions": np.asarray(actions, np.float32),
        "frames": frames,
        "success": success,
        "invalid": invalid,
    }


def _side_by_side(left: list, right: list) -> list[np.ndarray]:
    """Frames of two episodes next to each other (the shorter one holds its last frame), 8 px apart."""
    n = max(len(left), len(right))
    out = []
    for i in range(n):
        a, b = np.asarray(left[min(i, len(left) - 1)]), np.asarray(right[min(i, len(right) - 1)])
        h = max(a.shape[0], b.shape[0])
        pad = [np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)), constant_values=255) for x in (a, b)]
        gap = np.full((h, 8, 3), 255, np.uint8)
        out.append(np.concatenate([pad[0], gap, pad[1]], 1).astype(np.uint8))
    return out


def _error_plot(path: Path, open_loop: dict, closed_loop: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(open_loop), figsize=(4.2 * len(open_loop), 3.4), squeeze=False)
    for ax, name in zip(axes[0], open_loop, strict=True):
        k = np.arange(1, len(open_loop[name]) + 1)
        ax.plot(k, open_loop[name], label="open loop on the real actions")
        kc = np.arange(1, len(closed_loop[name]) + 1)
        ax.plot(kc, closed_loop[name], "--", label="closed loop: imagined vs real episode")
        ax.set_xlabel("horizon k (steps)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def imagine(
    world_model: str,
    policy,
    task: str,
    seed: int,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    device: str = "cpu",
) -> dict:
    """The policy from the real start of ``task`` at ``seed``: once in the real sim, once in the world model.

    Writes ``OUT/imagine.mp4`` (H.264: left the real sim, right the imagined episode, both drawn by the
    task's own renderer, the imagined one from its predicted states), ``OUT/error_vs_horizon.png`` (the
    world model's open-loop error on the real episode's actions, and the closed-loop gap between the two
    episodes, against the horizon) and ``OUT/imagine.json`` (the numbers). Returns the JSON's content.
    """

    out = Path(out_dir)
    imag = ImaginedTaskEnv(world_model, task=task, device=device)
    real = make_env(task, obs_mode="lowdim")
    try:
        pol = build_policy(policy, imag.task_spec, device=device)
        check_compatible(pol.config, imag.task_spec, describe_policy(policy))
        if imag.render() is None:
            raise VlaflowError(
                f"task {task!r} has no renderer of a predicted state (have: {list(STATE_RENDERERS)})"
            )
        steps = max_steps or real.task_spec.max_steps
        real_run = _rollout(real, pol, seed, steps)
        imag_run = _rollout(imag, pol, seed, steps)
        wm = imag.venv.model
        cfg = wm.config
        t_real = len(real_run["actions"])
        window = np.repeat(real_run["states"][:1], cfg.n_obs_steps, 0)[None].astype(np.float32)
        gen = torch.Generator().manual_seed(int(seed))
        acts = torch.from_numpy(real_run["actions"][None])
        pred = wm.rollout(torch.from_numpy(window), acts, generator=gen)[0].cpu().numpy().astype(np.float64)
        groups = _error_groups(cfg.task, cfg.obs_dim, cfg.angle_dims)
        open_loop = state_errors(pred, real_run["states"][1 : t_real + 1], groups, cfg.angle_dims)
        n = min(len(imag_run["states"]), len(real_run["states"])) - 1
        closed = state_errors(
            imag_run["states"][1 : n + 1], real_run["states"][1 : n + 1], groups, cfg.angle_dims
        )
        out.mkdir(parents=True, exist_ok=True)
        video = write_mp4(
            out / "imagine.mp4", _side_by_side(real_run["frames"], imag_run["frames"]), real.task_spec.fps
        )
        plot = out / "error_vs_horizon.png"
        _error_plot(
            plot,
            open_loop,
            closed,
            f"{Path(world_model).name} on {task} seed {seed}: {describe_policy(policy)}",
        )
    finally:
        imag.close()
        real.close()
    summary = {
        "world_model": str(world_model),
        "policy": describe_policy(policy),
        "task": task,
        "seed": int(seed),
        "video": str(video),
        "video_layout": "left: real sim, right: imagined (scene drawn from the predicted state)",
        "n_frames": max(len(real_run["frames"]), len(imag_run["frames"])),
        "plot": str(plot),
        "real": {"length": t_real, "success": real_run["success"]},
        "imagined": {
            "length": len(imag_run["actions"]),
            "success": imag_run["success"],
            "invalid": imag_run["invalid"],
            "reward": imag.reward_name,
        },
        "open_loop_error": open_loop,
        "closed_loop_gap": closed,
    }
    (out / "imagine.json").write_text(json.dumps(summary, indent=1))
    return summary
