"""Meta-World v3 tasks (``mw:<name>``) behind the vlaflow task interface: a Sawyer arm at 80 Hz, MuJoCo.

- Action (Da = 4): Meta-World's ``[dx, dy, dz, grip]`` in [-1, 1]; the mocap target moves 1 cm per step
  at 1, ``grip`` is the finger effort (1 closes, -1 opens).
- ``obs.state`` low-dim (Ds = 39, names in ``task_spec.extra["state_names"]``): Meta-World's own
  observation with the goal visible (its multi-task setting): hand position (3), finger opening (1),
  up to two objects' position + quaternion wxyz (14, zero padded), the same 18 values of the previous
  step, and the goal position (3). ``obs_mode="image"`` keeps the proprioception (hand + fingers, 4) and
  adds one uint8 HWC camera per name in ``cameras`` (default ``corner``) rendered offscreen at
  ``image_size`` (``render_size``) with ``MUJOCO_GL=egl`` (set when unset).
- Success: the env's own ``info["success"]`` at each step; the episode terminates on it. The reward is
  the success flag (Meta-World's shaped reward is ``info["mw_reward"]``).
- Seeds: ``reset(seed=s)`` seeds the env's generator and lets Meta-World draw the goal and object
  positions itself (its ``_random_reset_space`` and per-task rejection rules, as when it builds its
  benchmark tasks), so a seed always gives the same scene. Meta-World makes train and test goals from
  different generator seeds; here seeds below ``TEST_SEED_START`` (100000) are the training positions
  (``vlaflow collect`` refuses others) and seeds from it on are the held-out positions that ``vlaflow
  eval`` uses by default. ``info["goal_split"]`` says which one an episode drew.

Rendering is software GL on a CPU machine: shadows, reflections, the skybox and multisampling are off
(with them an 84x84 frame costs ~250 ms instead of ~8 ms). Corner cameras are mounted upside down in
Meta-World's scene; their images are turned 180 degrees.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.interfaces import TaskSpec
from vlaflow.sim.metaworld_catalog import (
    INSTRUCTIONS,
    PREFIX,
    TASK_NAMES,
    TEST_SEED_START,
    env_name,
)

_FRAME = ["hand_x", "hand_y", "hand_z", "fingers_open"] + [
    f"obj{i}_{c}" for i in range(2) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")
]
STATE_NAMES = _FRAME + [f"prev_{n}" for n in _FRAME] + ["goal_x", "goal_y", "goal_z"]
PROPRIO_DIM = 4
# store camera name -> (Meta-World camera, turn the image 180 degrees)
CAMERAS: dict[str, tuple[str, bool]] = {
    "corner": ("corner", True),
    "corner2": ("corner2", True),
    "corner3": ("corner3", True),
    "topview": ("topview", False),
    "behind_gripper": ("behindGripper", False),
}
MAX_STEPS = 500  # Meta-World's max_path_length
MAX_RENDER = 480  # the scenes' offscreen buffer height


def goal_split(seed: int | None) -> str:
    """``"train"`` or ``"test"``: which goal/object positions a reset seed draws (None: unseeded)."""
    if seed is None:
        return "unseeded"
    return "test" if int(seed) >= TEST_SEED_START else "train"


@dataclass(frozen=True)
class MetaWorldConfig:
    """How one Meta-World task is presented."""

    task: str  # Meta-World task name without "-v3", e.g. "drawer-open"
    obs_mode: str = "lowdim"  # "lowdim" (39-d state) or "image" (proprioception + cameras)
    image_size: int = 84  # camera observation side (image mode)
    cameras: tuple[str, ...] = ("corner",)  # store camera names rendered in image mode
    max_steps: int = MAX_STEPS  # episode step limit
    render_camera: str = "corner"  # camera of env.render() (videos)
    video_size: int = 256  # env.render() frame side

    def __post_init__(self) -> None:
        if self.task not in INSTRUCTIONS:
            raise ConfigError(f"unknown Meta-World task {self.task!r}; known: {', '.join(TASK_NAMES)}")
        if self.obs_mode not in ("lowdim", "image"):
            raise ConfigError(
                f"{PREFIX}{self.task}: obs_mode must be 'lowdim' or 'image', got {self.obs_mode!r}"
            )
        for name, size in (("image_size", self.image_size), ("video_size", self.video_size)):
            if not 8 <= size <= MAX_RENDER:
                raise ConfigError(f"{PREFIX}{self.task}: {name} must be in [8, {MAX_RENDER}], got {size}")
        bad = [c for c in (*self.cameras, self.render_camera) if c not in CAMERAS]
        if bad or not self.cameras:
            raise ConfigError(
                f"{PREFIX}{self.task}: cameras must be a non-empty subset of {list(CAMERAS)}, got "
                f"{list(self.cameras)} (render_camera {self.render_camera!r})"
            )
        if not 1 <= self.max_steps <= 10_000:
            raise ConfigError(f"{PREFIX}{self.task}: max_steps must be in [1, 10000], got {self.max_steps}")


def metaworld_spec(cfg: MetaWorldConfig, fps: float) -> TaskSpec:
    if cfg.obs_mode == "lowdim":
        shapes, names = {"obs.state": (len(STATE_NAMES),)}, list(STATE_NAMES)
    else:
        shapes, names = {"obs.state": (PROPRIO_DIM,)}, list(STATE_NAMES[:PROPRIO_DIM])
        for cam in cfg.cameras:
            shapes[f"obs.image.{cam}"] = (cfg.image_size, cfg.image_size, 3)
    instructions = INSTRUCTIONS[cfg.task]
    return TaskSpec(
        name=PREFIX + cfg.task,
        fps=fps,
        obs_shapes=shapes,
        obs_dtypes={k: "uint8" if k.startswith("obs.image.") else "float32" for k in shapes},
        action_dim=4,
        action_low=(-1.0,) * 4,
        action_high=(1.0,) * 4,
        max_steps=cfg.max_steps,
        instruction=instructions[0],
        extra={
            "simulator": "metaworld",
            "metaworld_env": env_name(PREFIX + cfg.task),
            "robot": "sawyer",
            "state_names": names,
            "action_names": ["dx", "dy", "dz", "grip"],
            "action_scale_m": 0.01,
            "cameras": list(cfg.cameras) if cfg.obs_mode == "image" else [],
            "instructions": list(instructions),  # canonical first, then paraphrases
            "goal_observable": True,
            "test_seed_start": TEST_SEED_START,
        },
    )


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task (goal observable) behind the vlaflow task interface."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, cfg: MetaWorldConfig, render_mode: str | None = "rgb_array") -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self._mujoco = mujoco
        self.cfg = cfg
        self.env_name = env_name(PREFIX + cfg.task)
        env = ALL_V3_ENVIRONMENTS[self.env_name]()
        # Meta-World's multi-task setting (goal in the observation), goals drawn from the env's own seeded
        # generator at every reset instead of a frozen task vector.
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # cached on the old observability
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = cfg.max_steps
        env.seed(0)
        env.model.vis.quality.offsamples = 0  # no multisampling (software GL)
        self._env = env
        self.obs_mode = cfg.obs_mode
        self.render_mode = render_mode
        self.task_spec = metaworld_spec(cfg, 1.0 / (env.model.opt.timestep * env.frame_skip))
        self.max_steps = cfg.max_steps
        self._renderers: dict[int, object] = {}
        self._raw = np.zeros(len(STATE_NAMES))
        self._steps = 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        spaces = {}
        for k, shape in self.task_spec.obs_shapes.items():
            if self.task_spec.obs_dtypes[k] == "uint8":
                spaces[k] = gym.spaces.Box(0, 255, shape, np.uint8)
            else:
                spaces[k] = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    @property
    def metaworld_env(self):
        return self._env

    # ------------------------------------------------------------------------------------------ cameras
    def camera(self, name: str, size: int) -> np.ndarray:
        """One (size, size, 3) uint8 frame of store camera ``name``, top row first."""
        mj = self._mujoco
        r = self._renderers.get(size)
        if r is None:
            r = self._renderers[size] = mj.Renderer(self._env.model, size, size)
        mj_name, turn = CAMERAS[name]
        r.update_scene(self._env.data, camera=mj_name)
        for flag in (mj.mjtRndFlag.mjRND_SHADOW, mj.mjtRndFlag.mjRND_REFLECTION, mj.mjtRndFlag.mjRND_SKYBOX):
            r.scene.flags[flag] = 0
        img = r.render()
        return np.ascontiguousarray(img[::-1, ::-1] if turn else img)

    def _convert(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        if self.obs_mode == "lowdim":
            return {"obs.state": raw.astype(np.float32)}
        out = {"obs.state": raw[:PROPRIO_DIM].astype(np.float32)}
        for cam in self.cfg.cameras:
            out[f"obs.image.{cam}"] = self.camera(cam, self.cfg.image_size)
        return out

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Ground truth for the scripted experts: Meta-World's full 39-d observation (in every obs mode)."""
        return {"mw_obs": self._raw.copy(), "goal_pos": np.asarray(self._env._target_pos, dtype=np.float64)}

    # ------------------------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and options.get("reset_to_state") is not None:
            raise ConfigError(
                f"{self.task_spec.name}: replays from a recorded obs.state are not supported (Meta-World's "
                "observation does not determine the simulator state); evaluate by seed instead"
            )
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        self._env._did_see_sim_exception = False
        raw, _ = self._env.reset()
        self._raw = np.asarray(raw, dtype=np.float64)
        self._steps = 0
        return self._convert(self._raw), {"success": False, "goal_split": goal_split(seed)}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,):
            raise ValueError(
                f"{self.task_spec.name}: action must have 4 values [dx, dy, dz, grip], got {a.shape}"
            )
        raw, reward, _, _, info = self._env.step(np.clip(np.nan_to_num(a), -1.0, 1.0))
        self._raw = np.asarray(raw, dtype=np.float64)
        self._steps += 1
        success = bool(info.get("success", 0.0))
        truncated = self._steps >= self.max_steps
        out = {"success": success, "mw_reward": float(reward)}
        return self._convert(self._raw), float(success), success, truncated, out

    def render(self) -> np.ndarray:
        return self.camera(self.cfg.render_camera, self.cfg.video_size)

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()  # before the GL context goes away at exit (EGL errors otherwise)
        self._renderers.clear()
        self._env.close()


def make_metaworld(task: str, obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> MetaWorldEnv:
    """Factory behind every ``mw:<name>`` registry entry; ``render_size`` is the camera side (alias of
    ``image_size``), other keywords are :class:`MetaWorldConfig` fields (``cameras``, ``max_steps``, ...)."""
    render_mode = kw.pop("render_mode", "rgb_array")
    if render_size is not None:
        if "image_size" in kw and int(kw["image_size"]) != int(render_size):
            raise ConfigError(
                f"{PREFIX}{task}: render_size={render_size} and image_size={kw['image_size']} disagree"
            )
        kw["image_size"] = int(render_size)
    if "cameras" in kw:
        kw["cameras"] = tuple(kw["cameras"])
    return MetaWorldEnv(MetaWorldConfig(task.removeprefix(PREFIX), obs_mode, **kw), render_mode=render_mode)


class MetaWorldExpert:
    """Meta-World's scripted policy for the task (``metaworld.policies``), on the full 39-d observation.

    Its actions are clipped to the action bounds, which is what the env would do with them anyway, so the
    stored actions are the executed ones.
    """

    def __init__(self, env) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        self.env = env.unwrapped
        self.policy = ENV_POLICY_MAP[self.env.env_name]()

    def reset(self) -> None:
        pass  # Meta-World's policies are functions of the observation

    def act(self, obs=None) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
            a = self.policy.get_action(self.env.privileged_state()["mw_obs"])
        return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)
