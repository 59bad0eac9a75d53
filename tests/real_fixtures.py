"""Fixtures of the real-layer tests: a fake clock, fake runtimes, a fake arm on the in-process bus."""

from __future__ import annotations

import time

import numpy as np

from vlaflow.interfaces import InferResult, RuntimeSpec
from vlaflow.real import msgs
from vlaflow.real.contract import BOOL, IMAGE, JOINT_STATE, QosSpec, load_contract
from vlaflow.real.transport import LocalBus

NS = 1_000_000_000
PANDA_JOINTS = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
REST = np.array([0.0, -0.35, 0.0, -2.4, 0.0, 2.05, 0.785, 0.04, 0.04])


class Clock:
    def __init__(self, t_ns: int = 1_700_000_000 * NS):
        self.t = t_ns

    def __call__(self) -> int:
        return self.t

    def advance(self, s: float) -> int:
        self.t += round(s * NS)
        return self.t


class JointRuntime:
    """A joint-space policy: each chunk moves every arm joint by ``step`` per control step from obs."""

    def __init__(self, horizon=8, n_action_steps=4, step=0.01, delay_s=0.0, chunk_fn=None):
        self.config = RuntimeSpec(
            n_obs_steps=2,
            horizon=horizon,
            n_action_steps=n_action_steps,
            obs_shapes={"obs.state": (9,)},
            action_dim=8,
            fps=10.0,
        )
        self.step, self.delay_s, self.chunk_fn = step, delay_s, chunk_fn
        self.calls, self.seeds = 0, []

    def reset(self, seed=None):
        self.seeds.append(seed)

    def infer(self, obs, *, shift=None, delay=None):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        q = np.asarray(obs["obs.state"][-1], dtype=np.float64)
        if self.chunk_fn is not None:
            return InferResult(np.asarray(self.chunk_fn(q, self.calls), dtype=np.float32), nfe=1)
        base = q[:8].copy()
        ks = np.arange(self.config.horizon)[:, None]
        chunk = base[None] + self.step * ks * np.r_[np.ones(7), 0.0][None]
        return InferResult(chunk.astype(np.float32), nfe=1)


class DeltaRuntime:
    """A pick_place-shaped policy (21-dim state, [dx, dy, dz, gripper]) with a constant motion."""

    def __init__(self, motion=(0.5, 0.0, 0.0, -1.0), delay_s=0.0):
        self.config = RuntimeSpec(
            n_obs_steps=2,
            horizon=8,
            n_action_steps=4,
            obs_shapes={"obs.state": (21,)},
            action_dim=4,
            fps=10.0,
        )
        self.motion, self.delay_s = np.asarray(motion), delay_s

    def reset(self, seed=None):
        pass

    def infer(self, obs, *, shift=None, delay=None):
        if self.delay_s:
            time.sleep(self.delay_s)
        return InferResult(np.tile(self.motion, (8, 1)).astype(np.float32), nfe=1)


class FakeArm:
    """Publishes the panda_joints contract's streams on a LocalBus at the fake clock's time."""

    def __init__(self, bus: LocalBus, clock: Clock, contract="panda_joints"):
        self.bus, self.clock = bus, clock
        self.c = load_contract(contract)
        s = self.c.streams
        self.joints = bus.publisher(s["joints"].topic, JOINT_STATE, QosSpec())
        self.camera = bus.publisher(s["camera"].topic, IMAGE, QosSpec()) if "camera" in s else None
        self.q = REST.copy()
        self.enable_pub = bus.publisher(self.c.topics.enable, BOOL, QosSpec("latched"))
        self.estop_pub = bus.publisher(self.c.topics.estop, BOOL, QosSpec("latched"))

    def publish(self, q=None, names=None, stamp=None):
        t = self.clock() if stamp is None else stamp
        self.joints.publish(msgs.joint_state(t, names or PANDA_JOINTS, self.q if q is None else q))
        if self.camera is not None:
            self.camera.publish(msgs.image(t, np.zeros((84, 84, 3), np.uint8)))

    def enable(self, on=True):
        self.enable_pub.publish(msgs.bool_msg(on))

    def estop(self):
        self.estop_pub.publish(msgs.bool_msg(True))


def wait_landed(node, timeout=2.0) -> None:
    """Block until the node's in-flight inference (if any) has a result waiting (deterministic tests)."""
    w = node.worker
    t_end = time.monotonic() + timeout
    while w is not None and w.busy and w._results.empty() and time.monotonic() < t_end:
        time.sleep(0.001)


def commands(bus: LocalBus, topic: str) -> list:
    return bus.published.get(topic, [])
