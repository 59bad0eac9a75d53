"""PushT (gym-pusht 0.1.8, pymunk) behind the task interface, with the Diffusion Policy paper's conventions.

Observations are keyed like the episode store (every mode has the low-dim keys; ``image`` adds the camera)::

    obs.state      (5,)      float32  agent x, y, block x, y, block angle in [0, 2pi)  = data/state
    obs.keypoint   (9, 2)    float32  the T block's 9 keypoints in pixels               = data/keypoint
    obs.agent_pos  (2,)      float32  agent x, y                                        = data/state[:, :2]
    obs.n_contacts (1,)      float32  contacts per physics substep of the last step    ~ data/n_contacts
    obs.image.top  (S, S, 3) uint8    top-down render, S = render_size (96)             = data/img (as uint8)

Actions are the agent's target position in pixels (Da = 2). Reward is clip(coverage / 0.95, 0, 1); success
(and termination) is coverage > 0.95. 10 Hz control (10 physics substeps of 10 ms per step).

Start states (``reset(seed=s)``): by default the paper's test distribution, i.e. diffusion_policy's
``np.random.RandomState(s)`` draw set with its ``legacy_test: True`` order (block position before angle), so
seeds 100000..100049 are the paper's 50 test starts. ``start_distribution="gym_pusht"`` gives gym-pusht's own
draw instead. ``reset(options={"reset_to_state": s})`` places a *recorded* state: the block angle is set
before its position, because pymunk rotates a body about its centre of gravity, which for the T is not the
body origin; the recorded state holds the origin, so position-first (what gym-pusht does) misplaces the T.
"""

from __future__ import annotations

import math

import numpy as np
from gym_pusht.envs.pusht import PushTEnv
from gymnasium import spaces

from vlaflow.errors import VlaflowError
from vlaflow.interfaces import TaskSpec

OBS_MODES = ("lowdim", "image")
START_DISTRIBUTIONS = ("diffusion_policy", "gym_pusht")
CAMERA_KEY = "obs.image.top"
SUCCESS_COVERAGE = 0.95
FPS = 10.0
MAX_STEPS = 300
INSTRUCTION = "push the T-shaped block onto the green target"
SUBSTEPS = 10  # physics steps of 10 ms per 10 Hz control step (diffusion_policy's sim_hz // control_hz)

# The 9 block keypoints in the block's body frame (pixels). Derived from the human dataset (data/keypoint
# against data/state: kp = R(angle) @ local + block_xy holds to < 1e-3 px for 77% of its 25,650 steps, and the
# fit is checked in tests/test_sim_pusht.py); diffusion_policy chose them by farthest-point sampling.
LOCAL_KEYPOINTS = np.array(
    [
        [9.269787, 90.040974],
        [-60.983472, -1.186730],
        [60.912756, -1.393364],
        [-0.270503, 25.543625],
        [-14.064927, 122.815854],
        [39.002738, 32.857404],
        [-39.966414, 32.729656],
        [-16.824344, 62.863179],
        [23.541461, -1.700288],
    ],
    dtype=np.float64,
)


def keypoints_from_state(state: np.ndarray) -> np.ndarray:
    """Block keypoints (..., 9, 2) in px from PushT states (..., 5): R(angle) @ LOCAL_KEYPOINTS + block xy."""
    state = np.asarray(state, dtype=np.float64)
    c, s = np.cos(state[..., 4]), np.sin(state[..., 4])
    lx, ly = LOCAL_KEYPOINTS[:, 0], LOCAL_KEYPOINTS[:, 1]
    x = c[..., None] * lx - s[..., None] * ly + state[..., 2:3]
    y = s[..., None] * lx + c[..., None] * ly + state[..., 3:4]
    return np.stack([x, y], axis=-1)


def block_drift_px(sim_state: np.ndarray, recorded_state: np.ndarray) -> float:
    """Euclidean distance in pixels between the block positions of two PushT states (5,)."""
    d = np.asarray(sim_state, np.float64)[2:4] - np.asarray(recorded_state, np.float64)[2:4]
    return float(math.hypot(d[0], d[1]))


def pusht_spec(obs_mode: str = "lowdim", render_size: int = 96) -> TaskSpec:
    """The TaskSpec of PushT in ``obs_mode`` (see the module docstring for the keys)."""
    shapes: dict[str, tuple[int, ...]] = {
        "obs.state": (5,),
        "obs.keypoint": (9, 2),
        "obs.agent_pos": (2,),
        "obs.n_contacts": (1,),
    }
    dtypes = dict.fromkeys(shapes, "float32")
    if obs_mode == "image":
        shapes[CAMERA_KEY] = (render_size, render_size, 3)
        dtypes[CAMERA_KEY] = "uint8"
    return TaskSpec(
        name="pusht",
        fps=FPS,
        obs_shapes=shapes,
        obs_dtypes=dtypes,
        action_dim=2,
        action_low=(0.0, 0.0),
        action_high=(512.0, 512.0),
        max_steps=MAX_STEPS,
        instruction=INSTRUCTION,
        extra={
            "obs_mode": obs_mode,
            "success": f"coverage > {SUCCESS_COVERAGE}",
            "reward": "clip(coverage/0.95,0,1)",
        },
    )


class PushTTask(PushTEnv):
    """gym-pusht's PushTEnv with store-keyed observations, the paper's start states, angle-first state resets.

    ``info`` carries ``success`` (coverage > 0.95), ``coverage`` and gym-pusht's own entries. Use
    :meth:`get_state` for the (5,) state and :meth:`replay_drift` for the replay check.
    """

    def __init__(
        self,
        obs_mode: str = "lowdim",
        render_size: int | None = None,
        video_size: int = 384,
        start_distribution: str = "diffusion_policy",
    ):
        if obs_mode not in OBS_MODES:
            raise VlaflowError(
                f"pusht: unknown obs_mode {obs_mode!r}; expected one of {', '.join(OBS_MODES)}"
            )
        if start_distribution not in START_DISTRIBUTIONS:
            raise VlaflowError(
                f"pusht: unknown start_distribution {start_distribution!r}; "
                f"expected one of {', '.join(START_DISTRIBUTIONS)}"
            )
        render_size = 96 if render_size is None else int(render_size)
        if render_size < 8:
            raise VlaflowError(f"pusht: render_size must be >= 8, got {render_size}")
        if video_size < 16 or video_size % 2:
            raise VlaflowError(f"pusht: video_size must be an even number >= 16, got {video_size}")
        super().__init__(
            obs_type="state",
            render_mode="rgb_array",
            observation_width=render_size,
            observation_height=render_size,
            visualization_width=video_size,
            visualization_height=video_size,
        )
        self.obs_mode = obs_mode
        self.start_distribution = start_distribution
        self.task_spec = pusht_spec(obs_mode, render_size)
        self.observation_space = spaces.Dict(
            {
                k: spaces.Box(0, 255, shape, np.uint8)
                if self.task_spec.obs_dtypes[k] == "uint8"
                else spaces.Box(-np.inf, np.inf, shape, np.float32)
                for k, shape in self.task_spec.obs_shapes.items()
            }
        )
        self._angle_first = True

    # -- gym-pusht hooks ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        recorded = options is not None and options.get("reset_to_state") is not None
        if not recorded and self.start_distribution == "diffusion_policy":
            # diffusion_policy's legacy RandomState draw (its runner seeds test env i with start_seed + i).
            rs = np.random.RandomState(seed=seed)
            state = np.array(
                [
                    rs.randint(50, 450),
                    rs.randint(50, 450),
                    rs.randint(100, 400),
                    rs.randint(100, 400),
                    rs.randn() * 2 * np.pi - np.pi,
                ]
            )
            options = {**(options or {}), "reset_to_state": state}
        # Recorded states are placed angle-first; random draws keep the order their source used (position
        # first), so that a seed gives the same start as in diffusion_policy's / gym-pusht's evaluation.
        self._angle_first = recorded
        obs, info = super().reset(seed=seed, options=options)
        info["success"] = False
        info["coverage"] = self._get_coverage()
        return obs, info

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        if not np.all(np.isfinite(action)):
            raise VlaflowError(f"pusht: action must be finite, got {action.tolist()}")
        obs, reward, terminated, truncated, info = super().step(action)
        info["success"] = bool(info["is_success"])
        return obs, float(reward), bool(terminated), bool(truncated), info

    def _set_state(self, state):
        self.agent.position = [float(state[0]), float(state[1])]
        if self._angle_first:
            self.block.angle = float(state[4])
            self.block.position = [float(state[2]), float(state[3])]
        else:
            self.block.position = [float(state[2]), float(state[3])]
            self.block.angle = float(state[4])
        self.space.step(self.dt)  # let the placement take effect (velocities are zero: nothing moves)

    def get_obs(self) -> dict[str, np.ndarray]:
        state = self.get_state()
        obs = {
            "obs.state": state.astype(np.float32),
            "obs.keypoint": keypoints_from_state(state).astype(np.float32),
            "obs.agent_pos": state[:2].astype(np.float32),
            # diffusion_policy divides by its substep count (10); gym-pusht's own info divides by 1000.
            "obs.n_contacts": np.array([math.ceil(self.n_contact_points / SUBSTEPS)], dtype=np.float32),
        }
        if self.obs_mode == "image":
            obs[CAMERA_KEY] = np.ascontiguousarray(self._render(visualize=False), dtype=np.uint8)
        return obs

    # -- extras ---------------------------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """(5,) float64: agent x, y, block x, y, block angle mod 2pi (the human dataset's data/state)."""
        return np.array(
            [*self.agent.position, *self.block.position, self.block.angle % (2 * np.pi)], dtype=np.float64
        )

    def replay_drift(self, recorded_obs: dict[str, np.ndarray], t: int) -> float | None:
        """Block drift (px) between the current state and step ``t`` of a recorded episode (None: unknown)."""
        rec = recorded_obs.get("obs.state", recorded_obs.get("state"))
        if rec is None or t >= len(rec):
            return None
        return block_drift_px(self.get_state(), rec[t])


def make_pusht(obs_mode: str = "lowdim", render_size: int | None = None, **kw) -> PushTTask:
    """Build the PushT task env (``obs_mode`` "lowdim" or "image"; ``render_size`` of the camera, default 96).

    Extra keywords: ``video_size`` (frame size of ``env.render()``, default 384) and ``start_distribution``
    ("diffusion_policy", the paper's test starts, or "gym_pusht").
    """
    return PushTTask(obs_mode=obs_mode, render_size=render_size, **kw)
