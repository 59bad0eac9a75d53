"""``pick_place``: a Panda picks a cube and places it in a tray (pybullet, headless).

Built to be fast and easy to learn, because the ``vlaflow demo`` trains a low-dim policy on it in
minutes on two CPU cores:

- Action (Da = 4): ``[dx, dy, dz, gripper]`` in [-1, 1]. The end-effector position target is the
  *current* grasp-point position plus ``action[:3] * max_delta`` (so the action is Markov in the
  observation: no hidden integrated target), solved by inverse kinematics with the gripper pointing
  down at a fixed yaw. ``gripper > 0`` closes, ``<= 0`` opens (binary: a diffusion policy's blurry
  gripper value still yields a clean command).
- Control at 10 Hz, physics at 120 Hz (12 substeps per action).
- ``obs.state`` (Dg = 21, names in ``task_spec.extra["state_names"]``): grasp-point position (3),
  finger opening (1), arm joint positions (7), cube position (3), cube quaternion xyzw (4), tray
  centre (3). In ``obs_mode="image"`` it keeps only the first 11 (proprioception) and the camera
  ``obs.image.front`` (uint8 HWC, TinyRenderer, fixed camera) carries the scene.
- Success: cube centre inside the tray's inner walls, resting on the tray floor (low, slow), and no
  contact between the robot and the cube (released).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.interfaces import TaskSpec

ARM_JOINTS = tuple(range(7))
FINGER_JOINTS = (9, 10)
GRASP_LINK = 11  # panda_grasptarget: the point between the fingertips
# A comfortable elbow-up configuration with the hand pointing down; also the IK null-space rest pose.
REST_POSE = (0.0, -0.35, 0.0, -2.4, 0.0, 2.05, 0.785)
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
FINGER_OPEN = 0.04  # per finger, metres
GRIP_FORCE = 20.0  # newtons per finger; stronger squeezes pop the cube out at 120 Hz physics

STATE_NAMES = (
    ["ee_x", "ee_y", "ee_z", "gripper_width"]
    + [f"joint_{i}" for i in range(7)]
    + ["cube_x", "cube_y", "cube_z", "cube_qx", "cube_qy", "cube_qz", "cube_qw"]
    + ["tray_x", "tray_y", "tray_z"]
)
PROPRIO_DIM = 11
INSTRUCTION = "pick up the red cube and place it in the tray"


def _light_panda_urdf() -> str:
    """pybullet_data's Panda with its collision meshes as visuals (cached in the temp dir).

    The visual meshes (1-2 MB each) make TinyRenderer take ~70 ms per 84x84 frame; the collision
    meshes render the same silhouette at a few ms, which is what an 84x84 camera can show anyway.
    """
    import hashlib
    import tempfile
    from pathlib import Path

    import pybullet_data

    src = Path(pybullet_data.getDataPath()) / "franka_panda" / "panda.urdf"
    text = src.read_text()
    mesh_dir = (src.parent / "meshes").as_posix()
    text = text.replace("package://meshes/visual/", "package://meshes/collision/")
    text = text.replace("package://meshes/", mesh_dir + "/")
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"vlaflow_panda_light_{digest}.urdf"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)  # atomic: parallel workers never read a half-written file
    return str(out)


@dataclass(frozen=True)
class PickPlaceConfig:
    """Layout, control and success parameters of the pick_place task."""

    control_hz: float = 10.0  # env steps per second
    substeps: int = 12  # physics steps per env step (120 Hz physics: 2x faster than 240 Hz, same success)
    solver_iterations: int = 20  # pybullet constraint-solver iterations per physics step
    max_delta: float = 0.03  # metres the grasp point target moves per step at |action| = 1
    max_steps: int = 120  # episode step limit (truncation)
    cube_half: float = 0.02  # cube half side, metres
    cube_mass: float = 0.05  # kg
    cube_x: tuple[float, float] = (0.40, 0.60)  # cube spawn range along x (metres, robot base frame)
    cube_y: tuple[float, float] = (-0.22, -0.02)  # cube spawn range along y
    cube_yaw: float = 0.6  # cube spawn yaw drawn uniformly in [-cube_yaw, cube_yaw] radians
    tray_x: tuple[float, float] = (0.42, 0.58)  # tray centre range along x
    tray_y: tuple[float, float] = (0.12, 0.22)  # tray centre range along y
    tray_inner_half: float = 0.075  # half side of the tray's inner floor, metres
    tray_wall_height: float = 0.03  # wall height above the tray floor
    workspace_low: tuple[float, float, float] = (0.25, -0.35, 0.012)  # grasp point target box, min
    workspace_high: tuple[float, float, float] = (0.75, 0.40, 0.35)  # grasp point target box, max
    home: tuple[float, float, float] = (0.45, 0.0, 0.22)  # grasp point position at reset
    home_noise: float = 0.02  # uniform noise on the home position (metres, each axis)
    image_size: int = 84  # side of the square camera observation
    camera_target: tuple[float, float, float] = (0.48, 0.04, 0.04)  # fixed camera look-at point
    camera_distance: float = 0.62  # metres from the look-at point
    camera_yaw: float = 90.0  # degrees
    camera_pitch: float = -55.0  # degrees
    extra: dict = field(default_factory=dict)  # free-form notes carried into the task spec

    def __post_init__(self) -> None:
        if self.control_hz <= 0:
            raise ConfigError(f"PickPlaceConfig.control_hz must be > 0, got {self.control_hz}")
        if self.substeps < 1:
            raise ConfigError(f"PickPlaceConfig.substeps must be >= 1, got {self.substeps}")
        if not 0 < self.max_delta <= 0.1:
            raise ConfigError(f"PickPlaceConfig.max_delta must be in (0, 0.1] metres, got {self.max_delta}")
        if self.max_steps < 1:
            raise ConfigError(f"PickPlaceConfig.max_steps must be >= 1, got {self.max_steps}")
        if self.image_size < 8:
            raise ConfigError(f"PickPlaceConfig.image_size must be >= 8 pixels, got {self.image_size}")
        for name in ("cube_x", "cube_y", "tray_x", "tray_y"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(
                    f"PickPlaceConfig.{name} must be (low, high) with low <= high, got {(lo, hi)}"
                )


def pick_place_spec(obs_mode: str, cfg: PickPlaceConfig) -> TaskSpec:
    """The task spec of pick_place for an observation mode."""
    if obs_mode == "lowdim":
        shapes = {"obs.state": (len(STATE_NAMES),)}
        dtypes = {"obs.state": "float32"}
        names = list(STATE_NAMES)
    elif obs_mode == "image":
        s = cfg.image_size
        shapes = {"obs.state": (PROPRIO_DIM,), "obs.image.front": (s, s, 3)}
        dtypes = {"obs.state": "float32", "obs.image.front": "uint8"}
        names = list(STATE_NAMES[:PROPRIO_DIM])
    else:
        raise ConfigError(f"pick_place: obs_mode must be 'lowdim' or 'image', got {obs_mode!r}")
    return TaskSpec(
        name="pick_place",
        fps=cfg.control_hz,
        obs_shapes=shapes,
        obs_dtypes=dtypes,
        action_dim=4,
        action_low=(-1.0, -1.0, -1.0, -1.0),
        action_high=(1.0, 1.0, 1.0, 1.0),
        max_steps=cfg.max_steps,
        instruction=INSTRUCTION,
        extra={
            "simulator": "pybullet",
            "robot": "panda",
            "state_names": names,
            "action_names": ["dx", "dy", "dz", "gripper"],
            "action_scale_m": cfg.max_delta,
            "cameras": ["front"] if obs_mode == "image" else [],
            "success": "the cube rests inside the tray, released (ends the episode)",
            "reward": "1 at success, else 0",
            **cfg.extra,
        },
    )


class PickPlaceEnv(gym.Env):
    """Panda pick-and-place in pybullet (DIRECT mode: no window, one physics client per env)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs_mode: str = "lowdim",
        config: PickPlaceConfig | None = None,
        render_mode: str | None = "rgb_array",
        video_size: int | None = None,
    ) -> None:
        import pybullet as p
        import pybullet_data

        self.cfg = config or PickPlaceConfig()
        self.obs_mode = obs_mode
        self.task_spec = pick_place_spec(obs_mode, self.cfg)
        self.render_mode = render_mode
        self.video_size = int(video_size or max(self.cfg.image_size, 160))  # env.render() frame side
        self._p = p
        self._cid = p.connect(p.DIRECT)
        c = self._cid
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        p.setTimeStep(1.0 / (self.cfg.control_hz * self.cfg.substeps), physicsClientId=c)
        p.setPhysicsEngineParameter(numSolverIterations=self.cfg.solver_iterations, physicsClientId=c)
        self._plane = p.loadURDF("plane.urdf", physicsClientId=c)
        self._robot = p.loadURDF(_light_panda_urdf(), useFixedBase=True, physicsClientId=c)
        for j in range(-1, p.getNumJoints(self._robot, physicsClientId=c)):
            grey = [0.85, 0.85, 0.85, 1] if j < 8 else [0.25, 0.25, 0.25, 1]
            p.changeVisualShape(self._robot, j, rgbaColor=grey, physicsClientId=c)
        floor = [0.55, 0.45, 0.35, 1]
        p.changeVisualShape(self._plane, -1, textureUniqueId=-1, rgbaColor=floor, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.changeDynamics(self._robot, j, lateralFriction=1.5, spinningFriction=0.01, physicsClientId=c)
        h = self.cfg.cube_half
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[h, h, h], physicsClientId=c)
        vis = p.createVisualShape(
            p.GEOM_BOX, halfExtents=[h, h, h], rgbaColor=[0.9, 0.1, 0.1, 1], physicsClientId=c
        )
        self._cube = p.createMultiBody(
            self.cfg.cube_mass, col, vis, basePosition=[0.5, 0, h], physicsClientId=c
        )
        p.changeDynamics(self._cube, -1, lateralFriction=1.2, spinningFriction=0.01, physicsClientId=c)
        self._tray = self._make_tray()
        self._tray_pos = np.zeros(3)
        lows = [p.getJointInfo(self._robot, j, physicsClientId=c)[8] for j in ARM_JOINTS]
        highs = [p.getJointInfo(self._robot, j, physicsClientId=c)[9] for j in ARM_JOINTS]
        self._ik_kw = dict(
            lowerLimits=lows,
            upperLimits=highs,
            jointRanges=[hi - lo for lo, hi in zip(lows, highs, strict=True)],
            restPoses=list(REST_POSE),
            maxNumIterations=30,
        )
        self._down = p.getQuaternionFromEuler([math.pi, 0.0, 0.0])
        self._grip_closed = False
        self._steps = 0
        self._rng = np.random.default_rng()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        spaces = {}
        for k, shape in self.task_spec.obs_shapes.items():
            if self.task_spec.obs_dtypes[k] == "uint8":
                spaces[k] = gym.spaces.Box(0, 255, shape, np.uint8)
            else:
                spaces[k] = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self._view = p.computeViewMatrixFromYawPitchRoll(
            self.cfg.camera_target, self.cfg.camera_distance, self.cfg.camera_yaw, self.cfg.camera_pitch, 0, 2
        )
        self._proj = p.computeProjectionMatrixFOV(50, 1.0, 0.05, 3.0)

    # ----------------------------------------------------------------------------------------- scene
    def _make_tray(self) -> int:
        p, c, cfg = self._p, self._cid, self.cfg
        t, hw, wh = 0.005, cfg.tray_inner_half, cfg.tray_wall_height
        boxes = [([hw + t, hw + t, t], [0, 0, t])]  # floor
        for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            half = [t, hw + 2 * t, wh / 2] if sx else [hw + 2 * t, t, wh / 2]
            boxes.append((half, [sx * (hw + t), sy * (hw + t), 2 * t + wh / 2]))
        halves, poss = [b[0] for b in boxes], [b[1] for b in boxes]
        col = p.createCollisionShapeArray(
            [p.GEOM_BOX] * 5, halfExtents=halves, collisionFramePositions=poss, physicsClientId=c
        )
        vis = p.createVisualShapeArray(
            [p.GEOM_BOX] * 5,
            halfExtents=halves,
            visualFramePositions=poss,
            rgbaColors=[[0.3, 0.5, 0.9, 1]] * 5,
            physicsClientId=c,
        )
        return p.createMultiBody(0, col, vis, basePosition=[0.5, 0.2, 0], physicsClientId=c)

    @property
    def tray_floor_z(self) -> float:
        """Height of the tray floor's top surface."""
        return 0.01

    # ----------------------------------------------------------------------------------------- state
    def ee_pos(self) -> np.ndarray:
        return np.array(
            self._p.getLinkState(self._robot, GRASP_LINK, physicsClientId=self._cid)[4], dtype=np.float64
        )

    def gripper_width(self) -> float:
        js = self._p.getJointStates(self._robot, FINGER_JOINTS, physicsClientId=self._cid)
        return float(js[0][0] + js[1][0])

    def cube_pose(self) -> tuple[np.ndarray, np.ndarray]:
        pos, quat = self._p.getBasePositionAndOrientation(self._cube, physicsClientId=self._cid)
        return np.asarray(pos, dtype=np.float64), np.asarray(quat, dtype=np.float64)

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Ground-truth scene state for scripted experts (available in every obs mode)."""
        cube_pos, cube_quat = self.cube_pose()
        return {
            "ee_pos": self.ee_pos(),
            "gripper_width": np.array([self.gripper_width()]),
            "cube_pos": cube_pos,
            "cube_quat": cube_quat,
            "tray_pos": self._tray_pos.copy(),
        }

    def _state_vector(self) -> np.ndarray:
        s = self.privileged_state()
        joints = [js[0] for js in self._p.getJointStates(self._robot, ARM_JOINTS, physicsClientId=self._cid)]
        return np.concatenate(
            [s["ee_pos"], s["gripper_width"], joints, s["cube_pos"], s["cube_quat"], s["tray_pos"]]
        ).astype(np.float32)

    def _camera(self, size: int) -> np.ndarray:
        p = self._p
        _, _, rgba, _, _ = p.getCameraImage(
            size,
            size,
            self._view,
            self._proj,
            renderer=p.ER_TINY_RENDERER,
            flags=p.ER_NO_SEGMENTATION_MASK,
            physicsClientId=self._cid,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()

    def _obs(self) -> dict[str, np.ndarray]:
        state = self._state_vector()
        if self.obs_mode == "lowdim":
            return {"obs.state": state}
        return {"obs.state": state[:PROPRIO_DIM], "obs.image.front": self._camera(self.cfg.image_size)}

    def is_success(self) -> bool:
        p, c, cfg = self._p, self._cid, self.cfg
        cube_pos, _ = self.cube_pose()
        rel = np.abs(cube_pos[:2] - self._tray_pos[:2])
        inside = bool(np.all(rel < cfg.tray_inner_half - 0.5 * cfg.cube_half))
        resting_low = cube_pos[2] < self.tray_floor_z + cfg.cube_half + 0.01
        speed = np.linalg.norm(p.getBaseVelocity(self._cube, physicsClientId=c)[0])
        released = len(p.getContactPoints(self._robot, self._cube, physicsClientId=c)) == 0
        return bool(inside and resting_low and speed < 0.05 and released)

    # ----------------------------------------------------------------------------------------- control
    def _drive(self, target: np.ndarray) -> None:
        p, c = self._p, self._cid
        q = p.calculateInverseKinematics(
            self._robot, GRASP_LINK, target.tolist(), self._down, physicsClientId=c, **self._ik_kw
        )
        p.setJointMotorControlArray(
            self._robot,
            ARM_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=q[:7],
            forces=ARM_FORCES,
            physicsClientId=c,
        )
        finger = 0.0 if self._grip_closed else FINGER_OPEN
        p.setJointMotorControlArray(
            self._robot,
            FINGER_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=[finger, finger],
            forces=[GRIP_FORCE, GRIP_FORCE],
            physicsClientId=c,
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        p, c, cfg, rng = self._p, self._cid, self.cfg, self._rng
        cube_xy = np.array([rng.uniform(*cfg.cube_x), rng.uniform(*cfg.cube_y)])
        tray_xy = np.array([rng.uniform(*cfg.tray_x), rng.uniform(*cfg.tray_y)])
        yaw = rng.uniform(-cfg.cube_yaw, cfg.cube_yaw)
        home = np.asarray(cfg.home) + rng.uniform(-cfg.home_noise, cfg.home_noise, 3)
        self._tray_pos = np.array([tray_xy[0], tray_xy[1], 0.0])
        p.resetBasePositionAndOrientation(
            self._tray, self._tray_pos.tolist(), [0, 0, 0, 1], physicsClientId=c
        )
        p.resetBasePositionAndOrientation(
            self._cube,
            [cube_xy[0], cube_xy[1], cfg.cube_half],
            p.getQuaternionFromEuler([0, 0, yaw]),
            physicsClientId=c,
        )
        p.resetBaseVelocity(self._cube, [0, 0, 0], [0, 0, 0], physicsClientId=c)
        for j, q in zip(ARM_JOINTS, REST_POSE, strict=True):
            p.resetJointState(self._robot, j, q, 0.0, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.resetJointState(self._robot, j, FINGER_OPEN, 0.0, physicsClientId=c)
        # Teleport the arm onto the IK solution for the home pose (a few refinements), then settle.
        for _ in range(4):
            q = p.calculateInverseKinematics(
                self._robot, GRASP_LINK, home.tolist(), self._down, physicsClientId=c, **self._ik_kw
            )
            for j in ARM_JOINTS:
                p.resetJointState(self._robot, j, q[j], 0.0, physicsClientId=c)
        self._grip_closed = False
        self._drive(home)
        for _ in range(cfg.substeps):
            p.stepSimulation(physicsClientId=c)
        if options and options.get("reset_to_state") is not None:
            self._set_state(np.asarray(options["reset_to_state"], dtype=np.float64))
        self._steps = 0
        return self._obs(), {"success": False}

    def _set_state(self, state: np.ndarray) -> None:
        """Put the scene in a recorded low-dim ``obs.state`` (replays): arm, fingers, cube and tray.

        Velocities restart at zero, so a replay matches the recording closely but not bit-exactly.
        """
        if state.shape != (len(STATE_NAMES),):
            raise ValueError(
                f"pick_place: reset_to_state needs the {len(STATE_NAMES)}-dim low-dim obs.state "
                f"({', '.join(STATE_NAMES[:4])}, ...), got shape {state.shape}"
            )
        p, c = self._p, self._cid
        self._tray_pos = state[18:21].copy()
        p.resetBasePositionAndOrientation(
            self._tray, self._tray_pos.tolist(), [0, 0, 0, 1], physicsClientId=c
        )
        p.resetBasePositionAndOrientation(
            self._cube, state[11:14].tolist(), state[14:18].tolist(), physicsClientId=c
        )
        p.resetBaseVelocity(self._cube, [0, 0, 0], [0, 0, 0], physicsClientId=c)
        for j, q in zip(ARM_JOINTS, state[4:11], strict=True):
            p.resetJointState(self._robot, j, float(q), 0.0, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.resetJointState(self._robot, j, float(state[3]) / 2, 0.0, physicsClientId=c)
        self._grip_closed = bool(state[3] < FINGER_OPEN)  # a recording that starts holding the cube
        self._drive(self.ee_pos())

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,):
            raise ValueError(
                f"pick_place: action must have 4 values [dx, dy, dz, gripper], got shape {a.shape}"
            )
        a = np.clip(np.nan_to_num(a), -1.0, 1.0)
        cfg = self.cfg
        target = np.clip(self.ee_pos() + a[:3] * cfg.max_delta, cfg.workspace_low, cfg.workspace_high)
        self._grip_closed = bool(a[3] > 0.0)
        self._drive(target)
        for _ in range(cfg.substeps):
            self._p.stepSimulation(physicsClientId=self._cid)
        self._steps += 1
        success = self.is_success()
        truncated = self._steps >= cfg.max_steps
        return self._obs(), float(success), success, truncated, {"success": success}

    def render(self) -> np.ndarray:
        return self._camera(self.video_size)

    def close(self) -> None:
        if self._cid is not None and self._p.isConnected(self._cid):
            self._p.disconnect(self._cid)
        self._cid = None


def make_pick_place(obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> PickPlaceEnv:
    """Factory registered as ``pick_place`` in :data:`vlaflow.sim.tasks.TASKS`.

    ``render_size`` is the side of the camera observation (as for every task; same as the config's
    ``image_size``); ``video_size`` the side of ``env.render()`` frames (videos). Other keyword
    arguments are :class:`PickPlaceConfig` fields (e.g. ``max_steps=80``).
    """
    render_mode = kw.pop("render_mode", "rgb_array")
    video_size = kw.pop("video_size", None)
    if render_size is not None:
        if "image_size" in kw and int(kw["image_size"]) != int(render_size):
            raise ConfigError(
                f"pick_place: render_size={render_size} and image_size={kw['image_size']} disagree"
            )
        kw["image_size"] = int(render_size)
    return PickPlaceEnv(obs_mode, PickPlaceConfig(**kw), render_mode=render_mode, video_size=video_size)
