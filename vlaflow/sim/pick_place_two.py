"""``pick_place_two``: the instruction-following probe. Two cubes, one red and one blue, and a tray; the
instruction alone says which cube goes in the tray ("put the red cube in the tray" / "... blue ...").

Everything else is :mod:`vlaflow.sim.pybullet_tasks`' ``pick_place`` (Panda, 10 Hz, Da = 4). The scene of a
seed (both cube poses, the tray, the arm's start) does not depend on which cube is the target, so
``pick_place_two_red`` and ``pick_place_two_blue`` show the same scenes for the same seeds and differ only in
the instruction: a policy that ignores the instruction scores at most ~50% on the pair. ``pick_place_two``
draws the target per seed (for collecting demonstrations of both).

- ``obs.state`` (Dg = 20): grasp point (3), finger opening (1), arm joints (7), red cube position (3),
  blue cube position (3), tray centre (3). No cube orientations: the expert does not use them, and a
  tumbling cube's quaternion (with its sign flips) is noise to a cloned policy. Image mode: the first 11
  + ``obs.image.front``.
- ``info["instruction"]`` (from ``reset``) is the episode's instruction; the harness gives it to a
  language-conditioned policy and ``collect`` stores it as the episode's task text.
- Success: the target cube rests in the tray, released, and the other cube is not in the tray.
- ``episode_metrics()`` separates reading the instruction from the motor skill of finishing the placement:
  ``followed`` (the episode succeeded, or the first cube the grasp point came within 2.5 cm of was the
  instructed one: the policy went for it), ``wrong_cube_reached`` (it went for the other one first),
  ``target_lifted`` / ``wrong_cube_lifted`` (the first cube lifted 3 cm off the table).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.interfaces import TaskSpec
from vlaflow.sim.pybullet_tasks import PROPRIO_DIM, PickPlaceConfig, PickPlaceEnv, pick_place_spec

COLORS = {"red": (0.9, 0.1, 0.1, 1.0), "blue": (0.1, 0.25, 0.95, 1.0)}
INSTRUCTIONS = {c: f"put the {c} cube in the tray" for c in COLORS}
TARGETS = ("red", "blue", "random")
STATE_NAMES = (
    ["ee_x", "ee_y", "ee_z", "gripper_width"]
    + [f"joint_{i}" for i in range(7)]
    + [f"{c}_{n}" for c in COLORS for n in ("x", "y", "z")]
    + ["tray_x", "tray_y", "tray_z"]
)
MIN_SEPARATION = 0.09  # metres between the cube centres at reset: room for the open fingers
LIFTED = 0.03  # metres above its resting height that count as lifted
REACHED = 0.025  # grasp point to cube centre distance (metres) that counts as going for that cube


def two_cube_spec(obs_mode: str, cfg: PickPlaceConfig, target: str) -> TaskSpec:
    base = pick_place_spec(obs_mode, cfg)
    name = "pick_place_two" if target == "random" else f"pick_place_two_{target}"
    shapes = dict(base.obs_shapes)
    names = list(STATE_NAMES) if obs_mode == "lowdim" else list(STATE_NAMES[:PROPRIO_DIM])
    if obs_mode == "lowdim":
        shapes["obs.state"] = (len(STATE_NAMES),)
    texts = list(INSTRUCTIONS.values()) if target == "random" else [INSTRUCTIONS[target]]
    return TaskSpec(
        name=name,
        fps=base.fps,
        obs_shapes=shapes,
        obs_dtypes=dict(base.obs_dtypes),
        action_dim=base.action_dim,
        action_low=base.action_low,
        action_high=base.action_high,
        max_steps=base.max_steps,
        instruction="" if target == "random" else INSTRUCTIONS[target],
        extra={**base.extra, "state_names": names, "instructions": texts, "target": target},
    )


class TwoCubePickPlaceEnv(PickPlaceEnv):
    """pick_place with a red and a blue cube; ``target`` picks the instructed one (or per seed)."""

    def __init__(
        self,
        obs_mode: str = "lowdim",
        config: PickPlaceConfig | None = None,
        target: str = "random",
        render_mode: str | None = "rgb_array",
        video_size: int | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ConfigError(f"pick_place_two: target must be one of {TARGETS}, got {target!r}")
        super().__init__(obs_mode, config, render_mode=render_mode, video_size=video_size)
        p, c, h = self._p, self._cid, self.cfg.cube_half
        self.target_mode = target
        self.task_spec = two_cube_spec(obs_mode, self.cfg, target)
        self.observation_space["obs.state"] = gym.spaces.Box(
            -np.inf, np.inf, self.task_spec.obs_shapes["obs.state"], np.float32
        )
        red = self._cube  # the parent's cube (already red)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[h, h, h], physicsClientId=c)
        vis = p.createVisualShape(
            p.GEOM_BOX, halfExtents=[h, h, h], rgbaColor=COLORS["blue"], physicsClientId=c
        )
        blue = p.createMultiBody(self.cfg.cube_mass, col, vis, basePosition=[0.5, -0.1, h], physicsClientId=c)
        p.changeDynamics(blue, -1, lateralFriction=1.2, spinningFriction=0.01, physicsClientId=c)
        self._cubes = {"red": red, "blue": blue}
        # a grey tray, so that "blue" names only one thing in the camera image
        p.changeVisualShape(self._tray, -1, rgbaColor=[0.75, 0.75, 0.72, 1], physicsClientId=c)
        self.target = "red"
        self._first_lifted: str | None = None
        self._first_reached: str | None = None
        self._succeeded = False

    # The parent's `_cube` is the instructed cube, so its expert, success test and contact checks apply to
    # the target; the other cube is the distractor.
    @property
    def distractor(self) -> str:
        return "blue" if self.target == "red" else "red"

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and options.get("reset_to_state") is not None:
            raise ConfigError("pick_place_two: replays from a recorded state are not supported")
        self._cube = self._cubes["red"]
        super().reset(seed=seed)
        p, c, cfg = self._p, self._cid, self.cfg
        # Layout and target from separate streams of the seed: the same seed gives the same scene whichever
        # cube the instruction names.
        base = seed if seed is not None else int(self._rng.integers(2**31))
        rng = np.random.default_rng([int(base), 2])
        first = np.array([rng.uniform(*cfg.cube_x), rng.uniform(*cfg.cube_y)])
        for _ in range(1000):
            second = np.array([rng.uniform(*cfg.cube_x), rng.uniform(*cfg.cube_y)])
            if np.linalg.norm(second - first) >= MIN_SEPARATION:
                break
        for color, xy in zip(COLORS, (first, second), strict=True):
            yaw = rng.uniform(-cfg.cube_yaw, cfg.cube_yaw)
            p.resetBasePositionAndOrientation(
                self._cubes[color],
                [xy[0], xy[1], cfg.cube_half],
                p.getQuaternionFromEuler([0, 0, yaw]),
                physicsClientId=c,
            )
            p.resetBaseVelocity(self._cubes[color], [0, 0, 0], [0, 0, 0], physicsClientId=c)
        pick = np.random.default_rng([int(base), 3]).integers(2)
        self.target = self.target_mode if self.target_mode != "random" else ("red", "blue")[pick]
        self._cube = self._cubes[self.target]
        self._first_lifted, self._first_reached, self._succeeded = None, None, False
        return self._obs(), {
            "success": False,
            "instruction": INSTRUCTIONS[self.target],
            "target": self.target,
        }

    def _pose(self, color: str) -> tuple[np.ndarray, np.ndarray]:
        pos, quat = self._p.getBasePositionAndOrientation(self._cubes[color], physicsClientId=self._cid)
        return np.asarray(pos, dtype=np.float64), np.asarray(quat, dtype=np.float64)

    def _state_vector(self) -> np.ndarray:
        s = self.privileged_state()
        joints = [js[0] for js in self._p.getJointStates(self._robot, range(7), physicsClientId=self._cid)]
        cubes = [self._pose(color)[0] for color in COLORS]
        return np.concatenate([s["ee_pos"], s["gripper_width"], joints, *cubes, s["tray_pos"]]).astype(
            np.float32
        )

    def _in_tray(self, color: str) -> bool:
        pos, _ = self._pose(color)
        rel = np.abs(pos[:2] - self._tray_pos[:2])
        return bool(np.all(rel < self.cfg.tray_inner_half - 0.5 * self.cfg.cube_half))

    def is_success(self) -> bool:
        return super().is_success() and not self._in_tray(self.distractor)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self._first_reached is None:
            ee = self.ee_pos()
            for color in COLORS:
                if np.linalg.norm(self._pose(color)[0] - ee) < REACHED:
                    self._first_reached = color
                    break
        if self._first_lifted is None:
            for color in COLORS:
                if self._pose(color)[0][2] > self.cfg.cube_half + LIFTED:
                    self._first_lifted = color
                    break
        self._succeeded = self._succeeded or bool(info["success"])
        return obs, reward, terminated, truncated, info

    def episode_metrics(self) -> dict[str, float]:
        """Per-episode probe measures (the harness adds them to the episode's report entry)."""
        return {
            "followed": float(self._succeeded or self._first_reached == self.target),
            "wrong_cube_reached": float(self._first_reached == self.distractor),
            "target_lifted": float(self._first_lifted == self.target),
            "wrong_cube_lifted": float(self._first_lifted == self.distractor),
        }


def make_pick_place_two(
    target: str = "random", obs_mode: str = "lowdim", render_size: int | None = None, **kw
) -> TwoCubePickPlaceEnv:
    """Factory behind ``pick_place_two`` (target per seed), ``pick_place_two_red`` and ``..._blue``;
    keywords as for :func:`vlaflow.sim.pybullet_tasks.make_pick_place`."""
    render_mode = kw.pop("render_mode", "rgb_array")
    video_size = kw.pop("video_size", None)
    if render_size is not None:
        if "image_size" in kw and int(kw["image_size"]) != int(render_size):
            raise ConfigError(
                f"pick_place_two: render_size={render_size} and image_size={kw['image_size']} disagree"
            )
        kw["image_size"] = int(render_size)
    return TwoCubePickPlaceEnv(
        obs_mode, PickPlaceConfig(**kw), target, render_mode=render_mode, video_size=video_size
    )
