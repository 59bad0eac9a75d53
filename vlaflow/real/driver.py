"""Episode driver for a simulated arm and a node over topics: reset a scene, enable, watch, disable.

What a benchmark or a test runs beside ``vlaflow sim-arm`` and ``vlaflow node`` to play evaluation
episodes through the topics: ``reset:SEED`` on the episode topic (the arm resets its scene, the node
re-seeds its runtime), enable True, then the arm's status (``/vlaflow/sim/status``, JSON per control
period) until success or ``max_steps``, enable False.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from vlaflow.real import msgs
from vlaflow.real.contract import BOOL, DIAGNOSTIC_ARRAY, STRING, QosSpec, RobotContract

STATUS_TOPIC = "/vlaflow/sim/status"


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    wall_s: float


class EpisodeDriver:
    def __init__(self, contract: RobotContract, transport):
        self.c, self.t = contract, transport
        self.enable_pub = transport.publisher(contract.topics.enable, BOOL, QosSpec("latched", 1))
        self.estop_pub = transport.publisher(contract.topics.estop, BOOL, QosSpec("latched", 1))
        self.episode_pub = transport.publisher(contract.topics.episode, STRING, QosSpec("reliable", 10))
        self._status: dict | None = None
        self._cv = threading.Condition()
        transport.subscribe(STATUS_TOPIC, STRING, QosSpec("reliable", 10), self._on_status)
        self.node_state: str | None = None  # from the node's diagnostics
        transport.subscribe(
            contract.topics.diagnostics, DIAGNOSTIC_ARRAY, QosSpec("reliable", 10), self._on_diag
        )

    def _on_diag(self, r) -> None:
        for st in r.msg.status:
            for kv in st.values:
                if kv.key == "state":
                    self.node_state = kv.value

    def wait_node(self, state: str, timeout: float) -> bool:
        """Wait (bounded) for the node's diagnostics to report ``state``; False on timeout."""
        t_end = time.monotonic() + timeout
        while self.node_state != state and time.monotonic() < t_end:
            time.sleep(0.02)
        return self.node_state == state

    def _on_status(self, r) -> None:
        with self._cv:
            self._status = json.loads(r.msg.data)
            self._cv.notify_all()

    def status(self, timeout: float = 5.0, pred=lambda s: True) -> dict:
        t_end = time.monotonic() + timeout
        with self._cv:
            while self._status is None or not pred(self._status):
                left = t_end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no simulated-arm status matching the wait within {timeout} s")
                self._cv.wait(left)
            return dict(self._status)

    def enable(self, on: bool) -> None:
        self.enable_pub.publish(msgs.bool_msg(on))

    def estop(self) -> None:
        self.estop_pub.publish(msgs.bool_msg(True))

    def episode(self, seed: int, max_steps: int, timeout_s: float | None = None) -> EpisodeResult:
        """One episode on scene ``seed``: success as soon as the arm reports it, else after ``max_steps``."""
        self.status(10.0)  # the arm is up
        self.episode_pub.publish(msgs.string_msg(f"reset:{seed}"))
        self.status(5.0, lambda s: s["seed"] == seed and s["step"] <= 1)
        t0 = time.monotonic()
        self.enable(True)
        limit = timeout_s or max_steps * self.c.dt * 3 + 10
        try:
            st = self.status(limit, lambda s: s["seed"] == seed and (s["success"] or s["step"] >= max_steps))
        finally:
            self.enable(False)
        # the node brings motion to rest first (hold commands keep the gripper as it is); a reset that
        # came before they stop would start the next scene with them
        time.sleep(self.c.safety.hold_decel_s + 3 * self.c.dt)
        self.wait_node("disabled", 5.0)
        return EpisodeResult(seed, bool(st["success"]), int(st["step"]), time.monotonic() - t0)
