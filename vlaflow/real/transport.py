"""The seam between the node logic and a middleware: subscribe, publish, the ROS clock.

Three transports implement :class:`Transport`: :class:`vlaflow.real.dds.DdsTransport` (CycloneDDS with
ROS 2 wire names and CDR; what every multi-process test runs), :mod:`vlaflow.real.rclpy_node` (rclpy, on
robots with ROS 2), and :class:`LocalBus` (in one process, for unit tests of the node logic).

QoS profiles (``QosSpec.profile``) as ROS 2 uses them: ``sensor`` best effort + keep last N + volatile
(sensor data), ``reliable`` reliable + keep last N + volatile (commands), ``latched`` reliable + keep last
N + transient local (enable / e-stop / instruction: a late joiner gets the last value).

A subscriber callback gets a :class:`Received`: the decoded message, its receive time (ns, ROS clock) and,
when the transport has them, the raw CDR bytes (for rosbag2 recording). A message that does not decode
goes to the ``on_error`` callback as a :class:`~vlaflow.real.msgs.Rejected` instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vlaflow.real.contract import QosSpec
from vlaflow.real.msgs import Rejected, decode_cdr, encode_cdr


def now_ns() -> int:
    """The ROS clock of the DDS transport: system time in ns (what header stamps carry)."""
    return time.time_ns()


@dataclass(frozen=True)
class Received:
    msg: Any
    recv_ns: int
    raw: bytes | None = None


Callback = Callable[[Received], None]
ErrorCallback = Callable[[Rejected], None]


class Publisher(Protocol):
    def publish(self, msg: Any) -> None: ...


class Transport(Protocol):
    def subscribe(
        self,
        topic: str,
        msgtype: str,
        qos: QosSpec,
        callback: Callback,
        on_error: ErrorCallback | None = None,
    ) -> None: ...

    def publisher(self, topic: str, msgtype: str, qos: QosSpec) -> Publisher: ...

    def now_ns(self) -> int: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------- local bus
class _LocalPublisher:
    def __init__(self, bus: LocalBus, topic: str, msgtype: str, qos: QosSpec):
        self.bus, self.topic, self.msgtype, self.qos = bus, topic, msgtype, qos

    def publish(self, msg: Any) -> None:
        self.bus._deliver(self.topic, self.msgtype, msg, self.qos.profile == "latched")


class LocalBus:
    """An in-process transport: ``publish`` round-trips the message through CDR and calls subscribers.

    Delivery is synchronous (in the publisher's thread); latched topics replay their last message to a
    late subscriber. ``clock`` can be replaced for tests on a fake clock.
    """

    def __init__(self, clock: Callable[[], int] = now_ns):
        self.clock = clock
        self._subs: dict[str, list[tuple[str, Callback, ErrorCallback | None]]] = {}
        self._latched: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.RLock()
        self.published: dict[str, list[Any]] = {}  # every message per topic (tests read it)

    def now_ns(self) -> int:
        return self.clock()

    def subscribe(self, topic, msgtype, qos, callback, on_error=None) -> None:
        with self._lock:
            self._subs.setdefault(topic, []).append((msgtype, callback, on_error))
            late = self._latched.get(topic)
        if late is not None and qos.profile == "latched":
            self._call(topic, msgtype, late[1], callback, on_error)

    def publisher(self, topic, msgtype, qos) -> _LocalPublisher:
        return _LocalPublisher(self, topic, msgtype, qos)

    def publish_raw(self, topic: str, msgtype: str, raw: bytes, latched: bool = False) -> None:
        """Deliver bytes as they would come off the wire (malformed-message tests)."""
        with self._lock:
            if latched:
                self._latched[topic] = (msgtype, raw)
            subs = list(self._subs.get(topic, ()))
        for typ, cb, err in subs:
            self._call(topic, typ, raw, cb, err)

    def _deliver(self, topic: str, msgtype: str, msg: Any, latched: bool) -> None:
        self.published.setdefault(topic, []).append(msg)
        self.publish_raw(topic, msgtype, encode_cdr(msg, msgtype), latched)

    def _call(self, topic, msgtype, raw, cb, err) -> None:
        try:
            msg = decode_cdr(raw, msgtype)
        except Exception as e:  # rosbags raises SerdeError and struct / index errors on bad bytes
            if err is not None:
                err(Rejected(topic, "cdr", f"a serialized {msgtype}", f"{type(e).__name__}: {e}"))
            return
        cb(Received(msg, self.clock(), raw))

    def close(self) -> None:
        with self._lock:
            self._subs.clear()
