"""The policy node on rclpy, for robots with ROS 2: a lifecycle node around the same :class:`PolicyNode`.

**Untested here**: rclpy cannot be installed on the machines this package is developed on, so this module
is written against the documented rclpy API (Humble and later) and kept thin; every decision lives in
the transport-independent node (:mod:`vlaflow.real.node`), which the CycloneDDS tests exercise between
real processes with the same topic names, types and QoS.

    source /opt/ros/humble/setup.bash          # rclpy, rosidl message packages
    pip install "vlaflow[real]"                # numpy, onnxruntime, rosbags, pyyaml (torch for checkpoints)
    vlaflow node --transport rclpy --policy onnx:DIR --robot my_robot.yaml
    ros2 lifecycle set /vlaflow_node configure && ros2 lifecycle set /vlaflow_node activate
    ros2 topic pub --once -q /vlaflow/enable std_msgs/msg/Bool "{data: true}" --qos-durability transient_local

Lifecycle: ``configure`` loads the contract and the policy and creates subscriptions and publishers;
``activate`` starts the control timer (contract rate) and the 1 Hz diagnostics timer; ``deactivate``
disengages (motion brought to rest) and stops the timers; ``cleanup`` drops everything. Sensor streams
use the sensor-data QoS (best effort, keep last), enable / e-stop are latched (reliable, transient local).
Messages are taken serialized (``raw=True``) and decoded with the rosbags typestore, and published
serialized, exactly as on the DDS transport. The tick runs on the ROS timer (no phase lock to a camera,
unlike ``PolicyNode.spin``); inference stays on the node's worker thread.
"""

from __future__ import annotations

from typing import Any

from vlaflow.real.contract import QosSpec
from vlaflow.real.msgs import Rejected, decode_cdr, encode_cdr
from vlaflow.real.transport import Received


def _require_rclpy():
    try:
        import rclpy  # noqa: F401
        from rclpy.lifecycle import LifecycleNode  # noqa: F401
    except ImportError as e:  # pragma: no cover - rclpy is not installable here
        raise ImportError(
            "the rclpy transport needs ROS 2 (Humble or later): source /opt/ros/<distro>/setup.bash first; "
            "without ROS 2 use the CycloneDDS transport (vlaflow node --transport dds)"
        ) from e


def ros_qos(spec: QosSpec):
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=spec.depth,
        reliability=ReliabilityPolicy.BEST_EFFORT if spec.profile == "sensor" else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL
        if spec.profile == "latched"
        else DurabilityPolicy.VOLATILE,
    )


class RclpyTransport:
    """:class:`~vlaflow.real.transport.Transport` over an rclpy node (serialized in, serialized out)."""

    def __init__(self, node):
        self.node = node
        self._subs: list = []
        self._pubs: list = []

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def subscribe(self, topic, msgtype, qos, callback, on_error=None) -> None:
        from rosidl_runtime_py.utilities import get_message

        def cb(raw: bytes) -> None:
            t = self.now_ns()
            try:
                msg = decode_cdr(raw, msgtype)
            except Exception as e:
                if on_error is not None:
                    on_error(Rejected(topic, "cdr", f"a serialized {msgtype}", f"{type(e).__name__}: {e}"))
                return
            callback(Received(msg, t, bytes(raw)))

        self._subs.append(
            self.node.create_subscription(get_message(msgtype), topic, cb, ros_qos(qos), raw=True)
        )

    def publisher(self, topic, msgtype, qos):
        from rosidl_runtime_py.utilities import get_message

        pub = self.node.create_publisher(get_message(msgtype), topic, ros_qos(qos))
        self._pubs.append(pub)

        class _Pub:
            def publish(self, msg: Any) -> None:
                pub.publish(encode_cdr(msg, msgtype))  # rclpy publishes serialized bytes as they are

        return _Pub()

    def close(self) -> None:
        for s in self._subs:
            self.node.destroy_subscription(s)
        for p in self._pubs:
            self.node.destroy_publisher(p)
        self._subs, self._pubs = [], []


def make_lifecycle_node(
    policy: str, robot: str, merge: str = "switch", device: str = "cpu", name="vlaflow_node"
):
    """The lifecycle node (see the module doc); spin it with an rclpy executor."""
    _require_rclpy()
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

    from vlaflow.real.contract import load_contract
    from vlaflow.real.node import NodeConfig, PolicyNode
    from vlaflow.real.runtime import load_runtime

    class VlaflowLifecycleNode(LifecycleNode):
        def __init__(self):
            super().__init__(name)
            self.core_node: PolicyNode | None = None
            self.transport: RclpyTransport | None = None
            self._timers: list = []

        def on_configure(self, state):
            contract = load_contract(robot)
            runtime = load_runtime(policy, merge, device)
            self.transport = RclpyTransport(self)
            self.core_node = PolicyNode(
                contract,
                runtime,
                self.transport,
                NodeConfig(merge=merge, name=name),
                log=lambda s: self.get_logger().info(s),
            )
            return TransitionCallbackReturn.SUCCESS

        def on_activate(self, state):
            n = self.core_node
            self._timers = [
                self.create_timer(n.dt, lambda: n.tick(self.transport.now_ns())),
                self.create_timer(1.0, n.publish_diagnostics),
            ]
            return super().on_activate(state)

        def on_deactivate(self, state):
            n = self.core_node
            n.enabled = False  # the next ticks bring motion to rest, then the run ends
            for _ in range(int(n.contract.safety.hold_decel_s / n.dt) + 2):
                n.tick(self.transport.now_ns())
            for t in self._timers:
                self.destroy_timer(t)
            self._timers = []
            return super().on_deactivate(state)

        def on_cleanup(self, state):
            if self.transport is not None:
                self.transport.close()
            self.core_node, self.transport = None, None
            return TransitionCallbackReturn.SUCCESS

    return VlaflowLifecycleNode()


def spin_lifecycle_node(policy: str, robot: str, merge: str = "switch", device: str = "cpu") -> None:
    """rclpy.init, the lifecycle node, spin until shutdown (``vlaflow node --transport rclpy``)."""
    _require_rclpy()
    import rclpy

    rclpy.init()
    node = make_lifecycle_node(policy, robot, merge, device)
    try:
        rclpy.spin(node)
    finally:
        node.destroy_node()
        rclpy.shutdown()
