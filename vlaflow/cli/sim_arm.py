"""The simulated arm process (``vlaflow sim-arm``): pybullet pick_place on the wall clock behind ROS 2 topics.

It lives in the CLI layer because it joins the two layer-4 packages: the task from ``vlaflow.sim`` and the
contract, messages and transport from ``vlaflow.real`` (which never imports sim, so a robot computer
installs the real layer without simulators).

Physics steps at control rate x substeps (120 Hz for pick_place) on the wall clock. Every physics step
publishes ``sensor_msgs/JointState`` (>= 100 Hz) and the contract's headerless vectors (end-effector and
object state); every control period (a *boundary*) also publishes the camera ``Image`` and the task's
success (``std_msgs/Bool``), all stamped with the scheduled time of the state they show. Commands:

- ``std_msgs/Float64MultiArray`` [dx, dy, dz, gripper]: applied at the next physics step after arrival
  exactly as ``PickPlaceEnv.step`` applies an action (grasp-point target = current + motion x max_delta,
  clipped to the workspace, by IK); the target then stays until the next command;
- ``trajectory_msgs/JointTrajectory``: replacement semantics (:mod:`vlaflow.real.trajectory`), joint
  position targets sampled at every physics step.

The episode topic takes ``reset:SEED`` (reset the scene at the next boundary). Faults: a latency drawn per
message (``fixed:L`` | ``uniform:A:B`` | ``normal:M:S`` | ``lognormal:MED:S``) plus uniform jitter delays
the sensor messages (order kept), and a drop probability loses some. A status line per boundary goes to
``/vlaflow/sim/status`` (JSON: seed, step, success) and, with ``log``, every received command to a
JSON-lines file (receive time, the command's step label) for the benchmarks.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.real import msgs
from vlaflow.real.contract import (
    BOOL,
    FLOAT64_ARRAY,
    IMAGE,
    JOINT_STATE,
    JOINT_TRAJECTORY,
    STRING,
    QosSpec,
    RobotContract,
)
from vlaflow.real.msgs import NS, Rejected
from vlaflow.real.trajectory import TrajectoryFollower
from vlaflow.sim.realtime import draw_latency, parse_latency

STATUS_TOPIC = "/vlaflow/sim/status"
PHYSICS_HZ = 120.0


@dataclass(frozen=True)
class SimArmConfig:
    """The simulated arm's settings (the robot's side is the contract)."""

    task: str = "pick_place"  # the pybullet task (pick_place)
    seed: int = 0  # scene seed of the first episode
    latency: str = "fixed:0"  # delay of every sensor message (s)
    jitter_s: float = 0.0  # + uniform [0, jitter_s) per message
    drop: float = 0.0  # probability a sensor message is lost
    fault_seed: int = 0  # seed of the latency / jitter / drop draws
    image_size: int = 84  # camera side (pixels)
    log: str | None = None  # JSON lines of received commands (benchmarks)

    def __post_init__(self):
        if self.task != "pick_place":
            raise ConfigError(
                f"sim-arm: only the pybullet task 'pick_place' is behind topics, got {self.task!r}"
            )
        parse_latency(self.latency)
        if not 0 <= self.drop < 1 or self.jitter_s < 0:
            raise ConfigError(
                f"sim-arm: drop must be in [0, 1) and jitter >= 0, got {self.drop}, {self.jitter_s}"
            )


class FaultyLink:
    """Publishes through ``transport`` after a drawn delay (FIFO kept), dropping a fraction of messages."""

    def __init__(self, cfg: SimArmConfig):
        self.kind, self.vals = parse_latency(cfg.latency)
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.fault_seed)
        self._queue: list = []
        self._cv = threading.Condition()
        self._n = 0
        self._last_due = 0.0
        self.dropped = self.sent = 0
        self.instant = self.kind == "fixed" and self.vals[0] == 0 and cfg.jitter_s == 0
        self._stop = False
        if not self.instant:
            threading.Thread(target=self._run, name="vlaflow-sim-faults", daemon=True).start()

    def send(self, pub, msg) -> None:
        if self.cfg.drop and self.rng.random() < self.cfg.drop:
            self.dropped += 1
            return
        self.sent += 1
        if self.instant:
            pub.publish(msg)
            return
        delay = draw_latency(self.kind, self.vals, self.rng) + self.rng.uniform(0, self.cfg.jitter_s)
        with self._cv:
            due = max(time.monotonic() + delay, self._last_due)  # FIFO: a stream never reorders
            self._last_due = due
            self._n += 1
            heapq.heappush(self._queue, (due, self._n, pub, msg))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._queue or self._queue[0][0] > time.monotonic()):
                    wait = None if not self._queue else max(0.0, self._queue[0][0] - time.monotonic())
                    self._cv.wait(wait)
                if self._stop:
                    return
                _, _, pub, msg = heapq.heappop(self._queue)
            pub.publish(msg)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()


class SimArm:
    """See the module doc; ``run(stop)`` steps until ``stop`` is set."""

    def __init__(self, contract: RobotContract, transport, cfg: SimArmConfig | None = None, log=print):
        from vlaflow.sim.pybullet_tasks import ARM_JOINTS, FINGER_JOINTS, PickPlaceConfig, PickPlaceEnv

        self.c, self.t, self.cfg = contract, transport, cfg or SimArmConfig()
        self.say = log
        rate = contract.control.rate_hz
        substeps = round(PHYSICS_HZ / rate)
        if abs(substeps * rate - PHYSICS_HZ) > 1e-6:
            raise ConfigError(f"sim-arm: control rate {rate} Hz must divide the {PHYSICS_HZ} Hz physics rate")
        self.env = PickPlaceEnv("lowdim", PickPlaceConfig(control_hz=rate, substeps=substeps, image_size=84))
        self.substeps = substeps
        self.arm_joints, self.finger_joints = ARM_JOINTS, FINGER_JOINTS
        p, cid, robot = self.env._p, self.env._cid, self.env._robot
        self.joint_names = [p.getJointInfo(robot, j, physicsClientId=cid)[1].decode() for j in ARM_JOINTS]
        self.joint_names += [p.getJointInfo(robot, j, physicsClientId=cid)[1].decode() for j in FINGER_JOINTS]
        self.link = FaultyLink(self.cfg)
        s = contract.streams
        self.pubs = {
            name: transport.publisher(spec.topic, spec.type, spec.qos)
            for name, spec in s.items()
            if name in ("joints", "ee", "scene", "camera")
        }
        self.success_pub = transport.publisher(contract.topics.success, BOOL, QosSpec("reliable", 10))
        self.status_pub = transport.publisher(STATUS_TOPIC, STRING, QosSpec("reliable", 10))
        cmd = contract.command
        self._pending: list = []
        self._lock = threading.Lock()
        transport.subscribe(cmd.topic, cmd.type, cmd.qos, self._on_command, self._on_bad)
        transport.subscribe(
            contract.topics.episode, STRING, QosSpec("reliable", 10), self._on_episode, self._on_bad
        )
        self.bad_commands = 0
        self.follower: TrajectoryFollower | None = None
        self._reset_to: int | None = self.cfg.seed
        self.seed = self.cfg.seed
        self.step = 0
        self.success = False
        self._log = open(self.cfg.log, "a") if self.cfg.log else None  # noqa: SIM115 (closed in run)

    # ------------------------------------------------------------------------------------------ inputs
    def _on_command(self, r) -> None:
        with self._lock:
            self._pending.append(r)

    def _on_bad(self, e: Rejected) -> None:
        self.bad_commands += 1
        self.say(f"sim-arm: dropped a message: {e}")

    def _on_episode(self, r) -> None:
        kind, _, arg = str(r.msg.data).partition(":")
        if kind == "reset":
            try:
                self._reset_to = int(arg) if arg else self.seed + 1
            except ValueError:
                self._on_bad(Rejected(self.c.topics.episode, "data", "reset[:SEED]", repr(r.msg.data)))

    # ------------------------------------------------------------------------------------------ physics
    def _joint_positions(self) -> tuple[np.ndarray, np.ndarray]:
        p, cid, robot = self.env._p, self.env._cid, self.env._robot
        states = p.getJointStates(
            robot, list(self.arm_joints) + list(self.finger_joints), physicsClientId=cid
        )
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def _apply(self, r, now_ns: int, substep: int = 0) -> None:
        env, cmd = self.env, self.c.command
        if self._log is not None:
            label = ""
            if cmd.type == FLOAT64_ARRAY and r.msg.layout.dim:
                label = r.msg.layout.dim[0].label
            stamp = msgs.stamp_ns(r.msg) if cmd.type == JOINT_TRAJECTORY else None
            traj = cmd.type == JOINT_TRAJECTORY
            data = (r.msg.points[0].positions if r.msg.points else []) if traj else r.msg.data
            row = {
                "recv_ns": r.recv_ns,
                "label": label,
                "stamp_ns": stamp,
                "step": self.step,
                "substep": substep,
                "data": [float(x) for x in data],
            }
            self._log.write(json.dumps(row) + "\n")
        if cmd.type == FLOAT64_ARRAY:
            a = np.asarray(r.msg.data, dtype=np.float64)
            if a.shape != (4,) or not np.isfinite(a).all():
                self._on_bad(
                    Rejected(cmd.topic, "data", "4 finite values [dx, dy, dz, gripper]", f"{a.tolist()}")
                )
                return
            a = np.clip(a, -1.0, 1.0)
            c = env.cfg
            target = np.clip(env.ee_pos() + a[:3] * c.max_delta, c.workspace_low, c.workspace_high)
            env._grip_closed = bool(a[3] > 0.0)
            env._drive(target)
            return
        if self.follower is None:
            q, _ = self._joint_positions()
            self.follower = TrajectoryFollower(self.joint_names[:8], q[:8], cmd.topic)
        try:
            self.follower.replace(r.msg, now_ns)
        except Rejected as e:
            self._on_bad(e)

    def _drive_joints(self, now_ns: int) -> None:
        from vlaflow.sim.pybullet_tasks import ARM_FORCES, GRIP_FORCE

        q = self.follower.sample(now_ns)
        p, cid, robot = self.env._p, self.env._cid, self.env._robot
        p.setJointMotorControlArray(
            robot,
            self.arm_joints,
            p.POSITION_CONTROL,
            targetPositions=q[:7],
            forces=ARM_FORCES,
            physicsClientId=cid,
        )
        p.setJointMotorControlArray(
            robot,
            self.finger_joints,
            p.POSITION_CONTROL,
            targetPositions=[q[7]] * 2,
            forces=[GRIP_FORCE] * 2,
            physicsClientId=cid,
        )

    def _publish_state(self, t_ns: int, boundary: bool) -> None:
        q, v = self._joint_positions()
        link = self.link
        if "joints" in self.pubs:
            link.send(self.pubs["joints"], msgs.joint_state(t_ns, self.joint_names, q, v))
        s = self.env.privileged_state()
        if "ee" in self.pubs:
            link.send(self.pubs["ee"], msgs.float64_array(np.r_[s["ee_pos"], s["gripper_width"]]))
        if "scene" in self.pubs:
            link.send(
                self.pubs["scene"], msgs.float64_array(np.r_[s["cube_pos"], s["cube_quat"], s["tray_pos"]])
            )
        if boundary:
            if "camera" in self.pubs:
                link.send(self.pubs["camera"], msgs.image(t_ns, self.env._camera(self.cfg.image_size)))
            self.success = self.success or self.env.is_success()
            self.success_pub.publish(msgs.bool_msg(self.success))
            status = {"seed": self.seed, "step": self.step, "success": self.success, "t_ns": t_ns}
            self.status_pub.publish(msgs.string_msg(json.dumps(status)))

    def _reset(self, seed: int) -> None:
        self.env.reset(seed=seed)
        self.seed, self.step, self.success, self.follower = seed, 0, False, None
        with self._lock:
            self._pending.clear()  # commands for the previous scene do not carry over

    def run(self, stop: threading.Event, duration_s: float | None = None) -> dict:
        sub_ns = round(NS / PHYSICS_HZ)
        t0 = self.t.now_ns()
        i = 0
        overruns = 0
        try:
            while not stop.is_set() and (duration_s is None or i * sub_ns < duration_s * NS):
                slot = t0 + i * sub_ns
                now = self.t.now_ns()
                if now < slot:
                    time.sleep((slot - now) / NS)
                elif now - slot > sub_ns:
                    overruns += 1
                boundary = i % self.substeps == 0
                fresh_scene = boundary and self._reset_to is not None
                if fresh_scene:
                    seed, self._reset_to = self._reset_to, None
                    self._reset(seed)
                    self.say(f"sim-arm: scene reset (seed {seed})")
                with self._lock:
                    pending, self._pending = self._pending, []
                for r in pending:
                    self._apply(r, self.t.now_ns(), i % self.substeps)
                if self.follower is not None:
                    self._drive_joints(slot)
                if not fresh_scene:  # the state a reset leaves is published as it is (like env.reset's obs)
                    self.env._p.stepSimulation(physicsClientId=self.env._cid)
                    if boundary:
                        self.step += 1
                self._publish_state(slot, boundary)
                i += 1
        finally:
            self.link.close()
            if self._log is not None:
                self._log.close()
        return {
            "physics_steps": i,
            "overruns": overruns,
            "dropped": self.link.dropped,
            "sent": self.link.sent,
            "bad_commands": self.bad_commands,
        }

    def close(self) -> None:
        self.env.close()


def load_contract_for(path: str | Path) -> RobotContract:
    from vlaflow.real.contract import load_contract

    c = load_contract(path)
    missing = [n for n in ("joints",) if n not in c.streams]
    if missing or c.streams["joints"].type != JOINT_STATE:
        raise ConfigError(f"sim-arm: contract {c.source} needs a JointState stream named 'joints'")
    cam = c.streams.get("camera")
    if cam is not None and cam.type != IMAGE:
        raise ConfigError(f"sim-arm: the 'camera' stream of {c.source} must be {IMAGE}, got {cam.type}")
    return c
