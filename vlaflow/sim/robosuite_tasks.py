"""robosuite tasks ``lift`` and ``can`` (PickPlaceCan): Panda, OSC_POSE, 20 Hz, offscreen cameras.

- Action (Da = 7): robosuite's OSC_POSE delta ``[dx, dy, dz, ax, ay, az, gripper]`` in [-1, 1]
  (0.05 m and 0.5 rad per step at 1; gripper 1 closes, -1 opens), from the BASIC composite
  controller of robosuite 1.5 with the arm part set to OSC_POSE.
- ``obs.state`` low-dim: ``robot0_eef_pos`` (3), ``robot0_eef_quat`` xyzw (4), ``robot0_gripper_qpos``
  (2) and robosuite's ``object-state`` (lift 10, can 14), i.e. robomimic's low-dim keys.
  ``obs_mode="image"`` keeps the 9 proprioceptive dims and adds ``obs.image.agentview`` and
  ``obs.image.wrist`` (uint8 HWC, flipped to the usual top-row-first convention); ``cameras=``
  picks a subset (rendering is software GL here, each camera costs a render per step).
- Seeding: robosuite samples placements from NumPy's global RNG; ``reset(seed=...)`` seeds it for the
  duration of the reset and restores the caller's global state afterwards.

Rendering needs ``MUJOCO_GL`` set before mujoco is imported; this module sets ``egl`` when unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.interfaces import TaskSpec
from vlaflow.sim.experts import PickPlaceMachine, PickScript, to_unit_delta

PROPRIO_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
PROPRIO_NAMES = ["eef_x", "eef_y", "eef_z", "eef_qx", "eef_qy", "eef_qz", "eef_qw", "finger_l", "finger_r"]
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}  # store camera name -> robosuite camera
OSC_POS_SCALE = 0.05  # metres per step at |action| = 1 (robosuite's BASIC OSC_POSE output_max)


@dataclass(frozen=True)
class RobosuiteTask:
    """How one vlaflow task maps onto a robosuite environment."""

    name: str  # vlaflow task name
    env_name: str  # robosuite environment class
    object_dim: int  # size of robosuite's object-state vector
    max_steps: int  # evaluation step limit at 20 Hz
    instruction: str  # language instruction


ROBOSUITE_TASKS: dict[str, RobosuiteTask] = {
    "lift": RobosuiteTask("lift", "Lift", 10, 200, "lift the red cube"),
    "can": RobosuiteTask("can", "PickPlaceCan", 14, 400, "pick up the can and place it in its bin"),
}


def robosuite_spec(
    task: RobosuiteTask,
    obs_mode: str,
    image_size: int,
    control_hz: float,
    cameras: tuple[str, ...] = tuple(CAMERAS),
) -> TaskSpec:
    if obs_mode == "lowdim":
        dim = len(PROPRIO_NAMES) + task.object_dim
        shapes, dtypes = {"obs.state": (dim,)}, {"obs.state": "float32"}
        names = PROPRIO_NAMES + [f"object_{i}" for i in range(task.object_dim)]
    elif obs_mode == "image":
        shapes = {"obs.state": (len(PROPRIO_NAMES),)}
        dtypes = {"obs.state": "float32"}
        for cam in cameras:
            shapes[f"obs.image.{cam}"] = (image_size, image_size, 3)
            dtypes[f"obs.image.{cam}"] = "uint8"
        names = list(PROPRIO_NAMES)
    else:
        raise ConfigError(f"{task.name}: obs_mode must be 'lowdim' or 'image', got {obs_mode!r}")
    return TaskSpec(
        name=task.name,
        fps=control_hz,
        obs_shapes=shapes,
        obs_dtypes=dtypes,
        action_dim=7,
        action_low=(-1.0,) * 7,
        action_high=(1.0,) * 7,
        max_steps=task.max_steps,
        instruction=task.instruction,
        extra={
            "simulator": "robosuite",
            "robosuite_env": task.env_name,
            "robot": "Panda",
            "controller": "BASIC/OSC_POSE",
            "state_names": names,
            "action_names": ["dx", "dy", "dz", "ax", "ay", "az", "gripper"],
            "cameras": list(cameras) if obs_mode == "image" else [],
        },
    )


class RobosuiteEnv(gym.Env):
    """A robosuite manipulation env behind the vlaflow task interface (gymnasium API, store keys)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str,
        obs_mode: str = "lowdim",
        image_size: int = 84,
        control_hz: float = 20.0,
        max_steps: int | None = None,
        render_camera: str = "agentview",
        render_mode: str | None = "rgb_array",
        video_size: int = 256,
        cameras: tuple[str, ...] | list[str] = tuple(CAMERAS),
    ) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        import robosuite as suite
        from robosuite.controllers import load_composite_controller_config

        if task not in ROBOSUITE_TASKS:
            raise ConfigError(f"unknown robosuite task {task!r}; known: {', '.join(ROBOSUITE_TASKS)}")
        if image_size < 8:
            raise ConfigError(f"{task}: image_size must be >= 8 pixels, got {image_size}")
        cameras = tuple(cameras)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ConfigError(
                f"{task}: cameras must be a non-empty subset of {list(CAMERAS)}, got {list(cameras)}"
            )
        self.cameras = cameras  # store camera names rendered in image mode (each costs a render per step)
        self.task = ROBOSUITE_TASKS[task]
        if max_steps is not None:
            self.task = RobosuiteTask(**{**self.task.__dict__, "max_steps": int(max_steps)})
        self.obs_mode = obs_mode
        self.task_spec = robosuite_spec(self.task, obs_mode, image_size, control_hz, cameras)
        self.render_mode = render_mode
        self.video_size = int(video_size)  # env.render() frame side
        self.render_camera = render_camera
        images = obs_mode == "image"
        controller = load_composite_controller_config(controller="BASIC", robot="Panda")
        self._env = suite.make(
            self.task.env_name,
            robots="Panda",
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=images or render_mode == "rgb_array",
            use_camera_obs=images,
            camera_names=[CAMERAS[c] for c in cameras],
            camera_heights=image_size,
            camera_widths=image_size,
            control_freq=control_hz,
            horizon=10**6,  # the wrapper truncates at task.max_steps
            ignore_done=True,
            hard_reset=False,  # re-building the MuJoCo model on every reset costs seconds
            reward_shaping=False,
        )
        self._rng = np.random.default_rng()
        self._steps = 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        spaces = {}
        for k, shape in self.task_spec.obs_shapes.items():
            if self.task_spec.obs_dtypes[k] == "uint8":
                spaces[k] = gym.spaces.Box(0, 255, shape, np.uint8)
            else:
                spaces[k] = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    @property
    def robosuite_env(self):
        return self._env

    def _convert(self, raw: dict) -> dict[str, np.ndarray]:
        proprio = [np.asarray(raw[k], dtype=np.float32) for k in PROPRIO_KEYS]
        if self.obs_mode == "lowdim":
            state = np.concatenate(proprio + [np.asarray(raw["object-state"], dtype=np.float32)])
            return {"obs.state": state}
        out = {"obs.state": np.concatenate(proprio)}
        for cam in self.cameras:
            out[f"obs.image.{cam}"] = np.ascontiguousarray(raw[f"{CAMERAS[cam]}_image"][::-1])
        return out

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Ground truth for scripted experts: grasp-site position, object position and the goal."""
        e = self._env
        ee = np.array(e.sim.data.site_xpos[e.robots[0].eef_site_id["right"]])
        if self.task.name == "lift":
            obj = np.array(e.sim.data.body_xpos[e.cube_body_id])
            goal = obj.copy()
            table_z = float(e.model.mujoco_arena.table_offset[2])
        else:
            obj = np.array(e.sim.data.body_xpos[e.obj_body_id[e.objects[e.object_id].name]])
            goal = np.array(e.target_bin_placements[e.object_id])
            table_z = float(e.bin2_pos[2])
        return {"ee_pos": ee, "object_pos": obj, "goal_pos": goal, "table_z": np.array([table_z])}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        saved = np.random.get_state()
        np.random.seed(int(self._rng.integers(0, 2**31 - 1)))
        try:
            raw = self._env.reset()
        finally:
            np.random.set_state(saved)
        self._steps = 0
        return self._convert(raw), {"success": False}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,):
            raise ValueError(
                f"{self.task.name}: action must have 7 values (OSC_POSE delta + gripper), got {a.shape}"
            )
        raw, _, _, _ = self._env.step(np.clip(np.nan_to_num(a), -1.0, 1.0))
        self._steps += 1
        success = bool(self._env._check_success())
        truncated = self._steps >= self.task.max_steps
        return self._convert(raw), float(success), success, truncated, {"success": success}

    def render(self) -> np.ndarray:
        s = self.video_size
        frame = self._env.sim.render(
            width=s, height=s, camera_name=CAMERAS.get(self.render_camera, self.render_camera)
        )
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        self._env.close()


def _image_size(task: str, render_size: int | None, kw: dict) -> None:
    """``render_size`` (the camera observation side, as for every task) is an alias of ``image_size``."""
    if render_size is not None:
        if "image_size" in kw and int(kw["image_size"]) != int(render_size):
            raise ConfigError(f"{task}: render_size={render_size} and image_size={kw['image_size']} disagree")
        kw["image_size"] = int(render_size)


def make_lift(obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> RobosuiteEnv:
    """Factory registered as ``lift``; ``render_size`` sets the camera side, other keywords go to
    :class:`RobosuiteEnv` (``video_size`` for ``env.render()`` frames, ``max_steps``, ...)."""
    _image_size("lift", render_size, kw)
    return RobosuiteEnv("lift", obs_mode, **kw)


def make_can(obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> RobosuiteEnv:
    """Factory registered as ``can`` (robosuite PickPlaceCan); keywords as for :func:`make_lift`."""
    _image_size("can", render_size, kw)
    return RobosuiteEnv("can", obs_mode, **kw)


class RobosuiteExpert:
    """Scripted pick-and-place for ``lift`` (grasp, lift) and ``can`` (grasp, carry to the bin, drop)."""

    def __init__(self, env, gain: float = 4.0) -> None:
        self.env = env.unwrapped
        self.gain = gain
        z = float(self.env.privileged_state()["table_z"][0])
        if self.env.task.name == "lift":
            script = PickScript(
                hover=0.06,
                grasp_offset=0.0,
                carry_z=z + 0.15,
                place_z=z + 0.15,
                close_steps=6,
                release_steps=2,
            )
        else:
            script = PickScript(
                hover=0.06,
                grasp_offset=0.0,
                carry_z=z + 0.25,
                place_z=z + 0.15,
                close_steps=6,
                release_steps=6,
                drop_dist=0.08,
            )
        self.machine = PickPlaceMachine(script)

    def reset(self) -> None:
        self.machine.reset()

    def act(self, obs=None) -> np.ndarray:
        st = self.env.privileged_state()
        err, close = self.machine.step(st["ee_pos"], st["object_pos"], st["goal_pos"])
        a = np.zeros(7, dtype=np.float32)
        a[:3] = to_unit_delta(err, OSC_POS_SCALE, self.gain)
        a[6] = 1.0 if close else -1.0
        return a
