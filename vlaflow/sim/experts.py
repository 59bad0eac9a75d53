"""Scripted experts for the arm tasks: one pick-and-place state machine over privileged object poses.

Phases: approach (hover above the object) -> descend -> grasp (close, wait) -> lift -> move (carry
above the goal) -> lower -> release (open, wait) -> retreat (go up). A drop during lift/move sends the
machine back to approach, so one slip costs time rather than the episode.

Every step the machine returns a position error (metres) and a gripper command; each task's adapter
turns that into its action vector (proportional, saturated at the task's per-step limit, which keeps
the expert's actions smooth and easy for a policy to imitate).

Experts read ground truth through ``env.privileged_state()`` (every task env provides it in every
observation mode), never from the observation, so image-mode collection works the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from vlaflow.errors import VlaflowError
from vlaflow.sim.metaworld_catalog import PREFIX
from vlaflow.sim.metaworld_catalog import TASK_NAMES as MW_TASK_NAMES


class Phase(IntEnum):
    APPROACH = 0
    DESCEND = 1
    GRASP = 2
    LIFT = 3
    MOVE = 4
    LOWER = 5
    RELEASE = 6
    RETREAT = 7


@dataclass(frozen=True)
class PickScript:
    """Geometry and timing of one pick-and-place script (metres, env steps)."""

    hover: float  # approach height above the object centre
    grasp_offset: float  # grasp point height relative to the object centre when closing
    carry_z: float  # absolute height of the grasp point while carrying
    place_z: float  # absolute height of the grasp point when releasing
    close_steps: int  # steps to hold still while the fingers close
    release_steps: int  # steps to hold still while the fingers open
    xy_tol: float = 0.008  # xy error that ends approach / move
    z_tol: float = 0.01  # z error that ends descend / lower
    drop_dist: float = 0.06  # object-to-grasp-point distance that counts as a drop while carrying

    def __post_init__(self) -> None:
        if self.close_steps < 1 or self.release_steps < 1:
            raise VlaflowError(
                f"PickScript: close_steps and release_steps must be >= 1, got "
                f"{self.close_steps} and {self.release_steps}"
            )


class PickPlaceMachine:
    """The state machine. ``step(ee, obj, goal)`` -> (position error (3,), close gripper?)."""

    def __init__(self, script: PickScript) -> None:
        self.script = script
        self.reset()

    def reset(self) -> None:
        self.phase = Phase.APPROACH
        self._count = 0
        self._hold_xy: np.ndarray | None = None

    def _advance(self, phase: Phase) -> None:
        self.phase = phase
        self._count = 0

    def step(self, ee: np.ndarray, obj: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, bool]:
        s = self.script
        ee, obj, goal = (np.asarray(v, dtype=np.float64) for v in (ee, obj, goal))
        if self.phase in (Phase.LIFT, Phase.MOVE, Phase.LOWER):
            if np.linalg.norm(obj - (ee - np.array([0.0, 0.0, s.grasp_offset]))) > s.drop_dist:
                self._advance(Phase.APPROACH)  # dropped it: start over
        for _ in range(len(Phase)):  # at most one pass through the phases per call
            target, close, done = self._phase_target(ee, obj, goal)
            if not done:
                break
            self._advance(Phase(min(self.phase + 1, Phase.RETREAT)))
            if self.phase in (Phase.GRASP, Phase.RELEASE, Phase.RETREAT):
                target, close, _ = self._phase_target(ee, obj, goal)
                break
        self._count += 1
        return target - ee, close

    def _phase_target(self, ee, obj, goal) -> tuple[np.ndarray, bool, bool]:
        s, ph = self.script, self.phase
        if ph == Phase.APPROACH:
            t = obj + np.array([0.0, 0.0, s.hover])
            t[2] = max(t[2], ee[2]) if np.linalg.norm(ee[:2] - obj[:2]) > 0.03 else t[2]
            done = np.linalg.norm(ee[:2] - obj[:2]) < s.xy_tol and abs(ee[2] - (obj[2] + s.hover)) < 0.03
            return t, False, done
        if ph == Phase.DESCEND:
            t = obj + np.array([0.0, 0.0, s.grasp_offset])
            done = abs(ee[2] - t[2]) < s.z_tol and np.linalg.norm(ee[:2] - obj[:2]) < 2 * s.xy_tol
            return t, False, done
        if ph == Phase.GRASP:
            t = obj + np.array([0.0, 0.0, s.grasp_offset])
            return t, True, self._count >= s.close_steps
        if ph == Phase.LIFT:
            t = np.array([ee[0], ee[1], s.carry_z])
            return t, True, ee[2] > s.carry_z - 0.03
        if ph == Phase.MOVE:
            t = np.array([goal[0], goal[1], s.carry_z])
            return t, True, np.linalg.norm(ee[:2] - goal[:2]) < s.xy_tol
        if ph == Phase.LOWER:
            t = np.array([goal[0], goal[1], s.place_z])
            return t, True, abs(ee[2] - s.place_z) < s.z_tol
        if ph == Phase.RELEASE:
            t = np.array([goal[0], goal[1], s.place_z])
            return t, False, self._count >= s.release_steps
        t = np.array([ee[0], ee[1], s.carry_z])
        return t, False, False


def to_unit_delta(err: np.ndarray, step_m: float, gain: float = 1.0) -> np.ndarray:
    """Position error (metres) -> per-axis action in [-1, 1] for a controller moving ``step_m`` per unit."""
    return np.clip(gain * np.asarray(err) / step_m, -1.0, 1.0)


class PickPlaceExpert:
    """Expert for ``pick_place`` (pybullet): action [dx, dy, dz, gripper]."""

    def __init__(self, env) -> None:
        self.env = env.unwrapped
        cfg = self.env.cfg
        floor = self.env.tray_floor_z
        self.machine = PickPlaceMachine(
            PickScript(
                hover=0.08,
                grasp_offset=0.0,
                carry_z=0.14,
                place_z=floor + cfg.cube_half + 0.03,
                close_steps=3,
                release_steps=2,
            )
        )

    def reset(self) -> None:
        self.machine.reset()

    def act(self, obs=None) -> np.ndarray:
        st = self.env.privileged_state()
        err, close = self.machine.step(st["ee_pos"], st["cube_pos"], st["tray_pos"])
        a = np.zeros(4, dtype=np.float32)
        a[:3] = to_unit_delta(err, self.env.cfg.max_delta)
        a[3] = 1.0 if close else -1.0
        return a


# task name -> expert class; each takes the env and exposes reset() and act(obs) -> action
EXPERTS: dict[str, str] = {
    "pick_place": "vlaflow.sim.experts:PickPlaceExpert",
    # the two-cube probe: the env's privileged "cube_pos" is the instructed cube
    "pick_place_two": "vlaflow.sim.experts:PickPlaceExpert",
    "pick_place_two_red": "vlaflow.sim.experts:PickPlaceExpert",
    "pick_place_two_blue": "vlaflow.sim.experts:PickPlaceExpert",
    "lift": "vlaflow.sim.robosuite_tasks:RobosuiteExpert",
    "can": "vlaflow.sim.robosuite_tasks:RobosuiteExpert",
    **{PREFIX + n: "vlaflow.sim.metaworld_tasks:MetaWorldExpert" for n in MW_TASK_NAMES},
}


def make_expert(task: str, env):
    """The scripted expert for ``task`` bound to ``env``."""
    import importlib

    if task not in EXPERTS:
        raise VlaflowError(
            f"no scripted expert for task {task!r}; experts exist for: {', '.join(sorted(EXPERTS))}"
        )
    module, name = EXPERTS[task].split(":")
    return getattr(importlib.import_module(module), name)(env)
