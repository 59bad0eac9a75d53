"""Peer processes of the multi-process DDS tests (``python tests/real_peers.py ROLE DOMAIN [ARGS]``).

Roles:
- ``wire-pub DOMAIN``: publish one sample of every wire type (latched) with :mod:`vlaflow.real.dds`, wait.
- ``wire-echo DOMAIN``: decode one sample of every wire type published by the test (raw rosbags bytes) with
  our subscriber, print each as rosbags CDR hex on a line ``TYPE HEX``, exit.
- ``node-expert DOMAIN SUMMARY``: the policy node over DDS with the pick_place scripted expert as its
  runtime (reads cube / tray from obs.state); an inference sleeps for the seconds last published on
  ``/test/slow`` (late-inference tests). Writes its summary JSON at exit.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from vlaflow.interfaces import InferResult, RuntimeSpec
from vlaflow.real import msgs
from vlaflow.real.contract import FLOAT64_ARRAY, QosSpec, load_contract
from vlaflow.real.dds import DdsTransport

LATCHED = QosSpec("latched", 1)


def samples() -> dict[str, object]:
    """One message of every wire type, with every field set (strings, sequences, nested types)."""
    t = 1_700_000_123_456_789_012
    rgb = (np.arange(6 * 5 * 3) % 251).astype(np.uint8).reshape(6, 5, 3)
    return {
        "sensor_msgs/msg/JointState": msgs.joint_state(
            t, ["j1", "joint_two"], [0.5, -1.25], [0.1], [3.0, 4.0]
        ),
        "sensor_msgs/msg/Image": msgs.image(t, rgb, frame_id="cam"),
        "sensor_msgs/msg/CompressedImage": msgs.compressed_image(t, rgb),
        "trajectory_msgs/msg/JointTrajectory": msgs.joint_trajectory(
            t, ["a", "b"], [([1.0, 2.0], [0.1, 0.2], 100_000_000), ([1.5, 2.5], [0.0, 0.0], 1_250_000_000)]
        ),
        "std_msgs/msg/Float64MultiArray": msgs.float64_array([1.0, 2.5, -3.0], label="step 7"),
        "std_msgs/msg/Bool": msgs.bool_msg(True),
        "std_msgs/msg/String": msgs.string_msg("pick up the red cube"),
        "diagnostic_msgs/msg/DiagnosticArray": msgs.diagnostic_array(t, "node", 1, "ok", {"a": 1, "b": "x"}),
        "builtin_interfaces/msg/Time": msgs.time_msg(t),
    }


def topic_of(msgtype: str) -> str:
    return "/wire/" + msgtype.split("/")[-1].lower()


def wire_pub(domain: int) -> None:
    t = DdsTransport(domain)
    pubs = []
    for typ, msg in samples().items():
        p = t.publisher(topic_of(typ), typ, LATCHED)
        p.publish(msg)
        pubs.append(p)
    print("ready", flush=True)
    sys.stdin.readline()  # the test closes our stdin when done
    t.close()


def wire_echo(domain: int) -> None:
    t = DdsTransport(domain)
    got: dict[str, bytes] = {}
    done = threading.Event()
    types = list(samples())

    def cb(typ):
        def f(r):
            got[typ] = msgs.encode_cdr(r.msg, typ)
            if len(got) == len(types):
                done.set()

        return f

    for typ in types:
        t.subscribe(topic_of(typ) + "_in", typ, LATCHED, cb(typ))
    print("ready", flush=True)
    done.wait(30)
    for typ, raw in got.items():
        print(typ, raw.hex(), flush=True)
    t.close()


class ExpertRuntime:
    """The pick_place state machine as a runtime (H = 2, Ta = 1: one machine step per inference)."""

    def __init__(self):
        from vlaflow.sim.experts import PickPlaceExpert, PickPlaceMachine, PickScript  # noqa: F401
        from vlaflow.sim.pybullet_tasks import PickPlaceConfig

        cfg = PickPlaceConfig()
        self.max_delta = cfg.max_delta
        self.script = PickScript(0.08, 0.0, 0.14, 0.01 + cfg.cube_half + 0.03, 3, 2)
        self.machine = PickPlaceMachine(self.script)
        self.config = RuntimeSpec(1, 2, 1, {"obs.state": (21,)}, action_dim=4, fps=10.0)
        self.slow = 0.0
        self.calls = 0

    def reset(self, seed=None):
        self.machine.reset()

    def infer(self, obs, *, shift=None, delay=None):
        from vlaflow.sim.experts import to_unit_delta

        self.calls += 1
        if self.slow:
            time.sleep(self.slow)
        s = np.asarray(obs["obs.state"][-1], dtype=np.float64)
        err, close = self.machine.step(s[0:3], s[11:14], s[18:21])
        a = np.r_[to_unit_delta(err, self.max_delta), 1.0 if close else -1.0]
        return InferResult(np.tile(a, (2, 1)).astype(np.float32), nfe=0)


def node_expert(domain: int, summary: str) -> None:
    from vlaflow.real.node import NodeConfig, PolicyNode

    t = DdsTransport(domain)
    rt = ExpertRuntime()
    t.subscribe("/test/slow", FLOAT64_ARRAY, LATCHED, lambda r: setattr(rt, "slow", float(r.msg.data[0])))
    node = PolicyNode(load_contract("panda_pick_place"), rt, t, NodeConfig(diagnostics_hz=5.0))
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    try:
        node.spin(stop, 120)
    finally:
        with open(summary, "w") as f:
            json.dump(
                {"runs": node.runs, "diagnostics": node.diagnostics(), "calls": rt.calls}, f, default=float
            )
        t.close()


if __name__ == "__main__":
    role, domain = sys.argv[1], int(sys.argv[2])
    {
        "wire-pub": lambda: wire_pub(domain),
        "wire-echo": lambda: wire_echo(domain),
        "node-expert": lambda: node_expert(domain, sys.argv[3]),
    }[role]()
