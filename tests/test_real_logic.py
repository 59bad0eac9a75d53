"""The real layer's transport-independent parts: contract, message checks, safety layer, node logic.

The node runs on the in-process bus with a fake clock and fake runtimes (multi-process DDS tests are in
test_real_dds.py).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from real_fixtures import (
    PANDA_JOINTS,
    REST,
    Clock,
    DeltaRuntime,
    FakeArm,
    JointRuntime,
    commands,
    wait_landed,
)

from vlaflow.deploy.executor import ExecutorCore, InferenceWorker
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.real import msgs
from vlaflow.real.contract import (
    JOINT_STATE,
    ROBOTS_DIR,
    QosSpec,
    check_policy,
    contract_from_dict,
    load_contract,
)
from vlaflow.real.node import NodeConfig, PolicyNode
from vlaflow.real.safety import EStop, SafetyLayer
from vlaflow.real.streams import FrameBuilder, StreamBuffer
from vlaflow.real.transport import LocalBus

NS = 1_000_000_000


def _raw_contract(name="panda_joints") -> dict:
    import yaml

    return yaml.safe_load((ROBOTS_DIR / f"{name}.yaml").read_text())


# ------------------------------------------------------------------------------------------- contract
def test_shipped_contracts_load_and_fit_their_policies():
    pp = load_contract("panda_pick_place")
    assert pp.obs_shapes() == {"obs.state": (21,), "obs.image.front": (84, 84, 3)}
    assert pp.obs_names("obs.state")[:5] == ["ee_x", "ee_y", "ee_z", "gripper_width", "panda_joint1"]
    check_policy(pp, DeltaRuntime().config)
    pj = load_contract("panda_joints")
    assert pj.command.type == "trajectory_msgs/msg/JointTrajectory" and pj.command.lookahead == 2
    check_policy(pj, JointRuntime().config)


def test_contract_unknown_field_and_bad_reference_are_named():
    d = _raw_contract()
    d["streams"]["joints"]["max_agee_s"] = 1
    with pytest.raises(ConfigError, match=r"streams\.joints: unknown field\(s\) \['max_agee_s'\]"):
        contract_from_dict(d, "robot.yaml")
    d = _raw_contract()
    d["observation"]["obs.state"] = ["joints.panda_joint9"]
    with pytest.raises(ConfigError, match=r"observation\.obs\.state: 'joints.panda_joint9'.*has names"):
        contract_from_dict(d, "robot.yaml")
    d = _raw_contract()
    d["action"]["low"] = d["action"]["low"][:3]
    with pytest.raises(ConfigError, match=r"action\.low: expected 8 values, got 3"):
        contract_from_dict(d, "robot.yaml")


def test_contract_refuses_a_policy_it_cannot_feed_listing_both_sides():
    spec = RuntimeSpec(2, 8, 4, {"obs.state": (7,), "obs.image.wrist": (96, 96, 3)}, action_dim=8, fps=10.0)
    with pytest.raises(ConfigError) as e:
        check_policy(load_contract("panda_joints"), spec, "ckpt")
    text = str(e.value)
    assert "policy needs:       obs.state (7,), obs.image.wrist (96, 96, 3)" in text
    assert "contract assembles: obs.state (9,), obs.image.front (84, 84, 3)" in text
    assert "obs.image.wrist is not mapped" in text and "obs.state: the policy needs (7,)" in text


# ------------------------------------------------------------------------------------------- messages
def test_stream_buffer_drops_malformed_messages_naming_topic_field_expected_found():
    c = load_contract("panda_joints")
    buf = StreamBuffer(c.streams["joints"])
    t = 1_700_000_000 * NS
    assert buf.push(msgs.joint_state(t, PANDA_JOINTS, REST), t)
    cases = [
        (msgs.joint_state(t + 1, PANDA_JOINTS[:8], REST[:8]), "name", "missing"),
        (msgs.joint_state(t + 2, PANDA_JOINTS + ["x"], np.r_[REST, 0]), "name", "unknown joint"),
        (
            msgs.joint_state(t + 3, PANDA_JOINTS, np.r_[REST[:8], np.nan]),
            "position",
            "nan at 'panda_finger_joint2'",
        ),
        (msgs.joint_state(t - 5, PANDA_JOINTS, REST), "header.stamp", "went backwards"),
        (msgs.joint_state(t + NS, PANDA_JOINTS, REST), "header.stamp", "in the future"),
        (msgs.joint_state(0, PANDA_JOINTS, REST), "header.stamp", "zero stamp"),
    ]
    for msg, field, found in cases:
        assert not buf.push(msg, t + 10)
        assert f"/joint_states: {field}: expected" in buf.last_reject and found in buf.last_reject
    assert sum(buf.rejected.values()) == len(cases) and buf.newest().capture_ns == t
    cam = StreamBuffer(c.streams["camera"])
    assert not cam.push(msgs.image(t, np.zeros((64, 84, 3), np.uint8)), t)
    assert "height x width: expected 84x84, found 64x84" in cam.last_reject
    assert not cam.push(msgs.image(t, np.zeros((84, 84, 3), np.uint8), encoding="rgba8"), t)
    assert "encoding: expected one of ['rgb8', 'bgr8'], found 'rgba8'" in cam.last_reject
    bgr = np.zeros((84, 84, 3), np.uint8)
    bgr[..., 0] = 7  # blue in BGR
    assert cam.push(msgs.image(t, bgr, encoding="bgr8"), t) and cam.newest().value[0, 0].tolist() == [0, 0, 7]


def test_frames_align_as_of_report_ages_and_go_stale():
    c = load_contract("panda_joints")
    fb = FrameBuilder(c, ["obs.state"])
    t = 1_700_000_000 * NS
    for k in range(3):
        fb.buffers["joints"].push(
            msgs.joint_state(t + k * NS // 10, PANDA_JOINTS, REST + k), t + k * NS // 10
        )
    f = fb.frame(t + NS // 10 + 1)  # between samples 1 and 2: sample 1 (as-of)
    assert f.ok and f.obs["obs.state"][0] == pytest.approx(REST[0] + 1) and f.ages_s["joints"] < 1e-6
    late = fb.frame(t + NS)  # newest sample is 0.8 s old, max_age 0.1
    assert not late.ok and late.stale == ["joints"] and late.ages_s["joints"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------- safety
def _safety(name="panda_joints"):
    c = load_contract(name)
    return c, SafetyLayer(c.action, c.safety, c.dt)


def test_chunk_validator_reason_codes():
    c, s = _safety()
    q = REST[:8].copy()
    s.reset(q)
    ok = np.tile(q, (8, 1))
    assert s.validate_chunk(ok, 0, q)
    bad = ok.copy()
    bad[3, 2] = np.inf
    assert s.validate_chunk(bad).reason == "non_finite"
    bad = ok.copy()
    bad[2, 0] = 2.96  # limit 2.9671, margin 0.01
    assert s.validate_chunk(bad).reason == "position_limit"
    bad = ok.copy()
    bad[1:, 1] += 0.3  # 3 rad/s > 2.175
    assert s.validate_chunk(bad).reason == "velocity"
    bad = ok.copy()
    bad[1:, 1] += 0.2 * np.arange(1, 8)  # 2 rad/s from rest in one step: 20 rad/s^2 > 7.5
    assert s.validate_chunk(bad).reason == "acceleration"
    far = ok + np.r_[0.6, np.zeros(7)]
    s.reset(None)
    assert s.validate_chunk(far, 0, q).reason == "first_action_far"
    assert s.interventions == {
        f"reject_{r}": 1
        for r in ("non_finite", "position_limit", "velocity", "acceleration", "first_action_far")
    }


def test_clamp_limits_step_and_workspace():
    c, s = _safety()
    q = REST[:8].copy()
    s.reset(q)
    out = s.clamp(q + np.r_[1.0, np.zeros(7)])  # a 1 rad jump: bounded by acceleration from rest
    assert 0 < out[0] - q[0] <= 7.5 * 0.1 * 0.1 + 1e-12 + 15 * 0.01 and s.interventions["clamp_step"] == 1
    out = s.clamp(np.r_[q[:7], 0.5])  # gripper beyond its range
    assert out[7] == 0.04 and s.interventions["clamp_range"] == 1
    pc, ps = _safety("panda_pick_place")
    ps.reset(np.zeros(4))
    ee = np.array([0.74, 0.0, 0.2])  # 1 cm from the +x wall; dx = 1 asks for 3 cm
    out = ps.clamp(np.array([1.0, 0.5, 0.0, 1.0]), ee)
    assert out[0] == pytest.approx(1 / 3) and out[1] == 0.5 and ps.interventions == {"clamp_workspace": 1}


def test_hold_decelerates_to_rest_and_never_replays():
    c, s = _safety()
    q = REST[:8].copy()
    s.reset(q)
    for k in range(1, 4):  # moving at 0.5 rad/s on joint 1
        s.commit(q + np.r_[0.05 * k, np.zeros(7)])
    last = s.last.copy()
    holds = []
    for _ in range(6):
        h = s.hold()
        s.commit(h)
        holds.append(h[0])
    v = np.diff([last[0], *holds]) / c.dt
    assert v[0] < 0.5 and np.all(np.diff(v) <= 1e-12) and v[-1] == 0  # slows monotonically, then rests
    assert holds[-1] - last[0] < 0.05 * 3  # stops within hold_decel_s (0.3 s) of motion
    pc, ps = _safety("panda_pick_place")
    ps.reset(np.zeros(4))
    ps.commit(np.array([0.8, -0.4, 0.0, 1.0]))
    h1 = ps.hold()
    ps.commit(h1)
    h2 = ps.hold()
    assert (
        0 < h1[0] < 0.8 and h2[0] == 0 and h2[1] == 0 and h2[3] == 1.0
    )  # 0.2 s decel at 10 Hz; gripper kept


def test_estop_latches():
    e = EStop()
    assert not e.tripped
    e.trip("topic", 5)
    e.trip("again", 6)
    assert e.tripped and e.reason == "topic" and e.tripped_at_ns == 5


def test_executor_tick_without_request_starts_no_inference():
    spec = JointRuntime().config
    rt = JointRuntime()
    with InferenceWorker(rt.infer, spec) as w:
        core = ExecutorCore(w, spec)
        core.observe(0, 0.0, {"obs.state": REST})
        core.prime(0)
        for k in range(1, 12):
            core.observe(k, k * 0.1, {"obs.state": REST})
            core.tick(k, request=False)
        assert rt.calls == 1 and core.stats()["underruns"] == 4  # the chunk covers steps 0..7


# ------------------------------------------------------------------------------------------- node
def _node(runtime=None, contract="panda_joints", **cfg):
    clock = Clock()
    bus = LocalBus(clock)
    c = load_contract(contract)
    node = PolicyNode(
        c, runtime or JointRuntime(), bus, NodeConfig(diagnostics_hz=0, **cfg), log=lambda s: None
    )
    arm = FakeArm(bus, clock, contract)
    return clock, bus, c, node, arm


def _follow(arm, bus, c):
    """The fake arm tracks the joint-trajectory command (its first point) perfectly."""
    cmds = commands(bus, c.command.topic)
    if cmds and c.command.type.endswith("JointTrajectory"):
        arm.q[:8] = cmds[-1].points[0].positions


def _run(node, arm, clock, n, publish=True):
    for _ in range(n):
        clock.advance(0.1)
        _follow(arm, node.transport, node.contract)
        if publish:
            arm.publish()
        node.tick(clock())
        wait_landed(node)


def test_node_engages_with_a_bounded_ramp_then_runs_the_policy():
    target = REST[:8] + np.r_[0.4, np.zeros(7)]
    rt = JointRuntime(chunk_fn=lambda q, n: np.tile(target, (8, 1)))
    clock, bus, c, node, arm = _node(rt)
    _run(node, arm, clock, 2)
    assert node.state == "disabled" and not commands(bus, c.command.topic)
    arm.enable()
    _run(node, arm, clock, 1)
    n_ramp = len(node._ramp)
    assert node.state == "running" and n_ramp >= 3
    _run(node, arm, clock, n_ramp + 6)
    cmds = commands(bus, c.command.topic)
    pos = np.array([m.points[0].positions[0] for m in cmds])
    v = np.diff(np.r_[REST[0], pos]) / 0.1
    assert np.all(v >= -1e-9) and v.max() <= 2.175 + 1e-9 and pos[-1] == pytest.approx(target[0])
    assert len(cmds[0].points) == 2 and cmds[0].joint_names == PANDA_JOINTS[:8]
    assert rt.calls >= 3  # primed at engage, primed after the ramp, then requests every Ta steps


def test_node_stale_observation_stops_requests_and_holds():
    clock, bus, c, node, arm = _node()
    arm.enable()
    _run(node, arm, clock, 6)
    calls = node.runtime.calls
    _run(node, arm, clock, 8, publish=False)  # the arm goes silent; joints max_age 0.1 s
    cmds = commands(bus, c.command.topic)
    assert node.runtime.calls == calls and node.run.holds["stale_observation"] >= 7
    tail = np.array([m.points[0].positions for m in cmds[-4:]])
    assert np.allclose(tail, tail[-1])  # at rest, not replaying the scheduled chunk
    assert node.diagnostics()["stale_frames"] >= 7


def test_node_late_inference_holds_until_a_chunk_lands():
    release = threading.Event()

    def chunk(q, n):
        if n >= 2:
            release.wait(5)
        return np.tile(q[:8], (8, 1)) + 0.01 * np.arange(8)[:, None] * np.r_[np.ones(7), 0][None]

    rt = JointRuntime(chunk_fn=chunk)
    clock, bus, c, node, arm = _node(rt)
    arm.enable()
    for _ in range(12):  # the second inference (started at step 4) hangs: steps 8.. have nothing
        clock.advance(0.1)
        _follow(arm, bus, c)
        arm.publish()
        node.tick(clock())
    assert node.run.holds.get("underrun", 0) >= 3 and node.core.stats()["underruns"] >= 3
    release.set()
    wait_landed(node)
    _run(node, arm, clock, 3)
    assert node.run.policy_actions > 8 and node.run.past_step_actions == 0


def test_estop_gates_output_from_the_next_tick_and_stays_latched():
    clock, bus, c, node, arm = _node()
    arm.enable()
    _run(node, arm, clock, 5)
    n = len(commands(bus, c.command.topic))
    arm.estop()
    _run(node, arm, clock, 1)
    assert len(commands(bus, c.command.topic)) == n and node.state == "estopped"
    arm.estop_pub.publish(msgs.bool_msg(False))
    arm.enable(False)
    arm.enable(True)
    _run(node, arm, clock, 5)
    assert len(commands(bus, c.command.topic)) == n and node.runs[-1]["end_reason"] == "estop"


def test_malformed_messages_are_counted_and_the_node_keeps_running():
    clock, bus, c, node, arm = _node()
    arm.enable()
    _run(node, arm, clock, 3)
    topic = c.streams["joints"].topic
    arm.publish(q=REST[:8], names=PANDA_JOINTS[:8])  # wrong joint count
    arm.publish(names=PANDA_JOINTS[:8] + ["elbow"])  # unknown name
    arm.publish(q=np.r_[REST[:8], np.nan])
    arm.publish(stamp=clock() - NS)  # backwards
    bus.publish_raw(topic, JOINT_STATE, b"\x00\x01\x00\x00\x05")  # truncated CDR
    _run(node, arm, clock, 4)
    d = node.diagnostics()
    cam = c.streams["camera"].topic  # the backwards stamp went out on the camera too
    assert d["rejected_messages"] == {topic: 5, cam: 1} and node.state == "running"
    assert node.frames.buffers["joints"].rejected == {"name": 2, "position": 1, "header.stamp": 1, "cdr": 1}
    assert node.run.policy_actions == node.run.ticks == 6  # every tick after engage still commanded


def test_node_refuses_a_policy_the_contract_cannot_feed():
    with pytest.raises(ConfigError, match="does not fit"):
        _node(DeltaRuntime())  # 21-dim state, 4-dim action on the joint contract


def test_delta_node_holds_to_zero_motion_on_disable():
    clock, bus, c, node, arm = _node(DeltaRuntime(), contract="panda_pick_place")
    pubs = {
        n: bus.publisher(s.topic, s.type, QosSpec())
        for n, s in c.streams.items()
        if n in ("joints", "ee", "scene", "camera")
    }

    def publish():
        t = clock()
        pubs["joints"].publish(msgs.joint_state(t, PANDA_JOINTS, REST))
        pubs["ee"].publish(msgs.float64_array([0.45, 0.0, 0.2, 0.08]))
        pubs["scene"].publish(msgs.float64_array(np.zeros(10)))
        pubs["camera"].publish(msgs.image(t, np.zeros((84, 84, 3), np.uint8)))

    arm.publish = publish
    arm.enable()
    _run(node, arm, clock, 4)
    cmds = commands(bus, c.command.topic)
    assert np.allclose(cmds[-1].data, [0.5, 0, 0, -1])
    arm.enable(False)
    _run(node, arm, clock, 4)
    cmds = commands(bus, c.command.topic)
    assert np.allclose(cmds[-1].data[:3], 0) and node.state == "disabled"
    assert node.runs[-1]["end_reason"] == "disabled" and "vlaflow:" in cmds[-1].layout.dim[0].label


# ------------------------------------------------------------------------------------------- trajectories
def test_trajectory_replacement_drops_past_points_and_replaces_future_ones():
    from vlaflow.real.trajectory import TrajectoryFollower

    t0 = 1_700_000_000 * NS
    f = TrajectoryFollower(["a", "b"], np.zeros(2))
    f.replace(msgs.joint_trajectory(t0, ["a", "b"], [([1.0, 2.0], [0.0, 0.0], NS)]), t0)
    assert f.sample(t0 + NS // 2) == pytest.approx([0.5, 1.0])  # Hermite with zero end velocities: midpoint
    assert f.sample(t0 + 2 * NS) == pytest.approx([1.0, 2.0])  # holds the last point
    # a new message at t0 + 0.5 s: its first point is already past (dropped), the rest replaces the future
    msg = msgs.joint_trajectory(t0, ["a"], [([9.0], [0.0], NS // 4), ([-1.0], [0.0], NS)])
    f.replace(msg, t0 + NS // 2)
    assert f.dropped_points == 1 and f.end_ns == t0 + NS
    assert f.sample(t0 + NS) == pytest.approx([-1.0, 1.0])  # joint b keeps its commanded position
    assert f.sample(t0 + NS // 2) == pytest.approx([0.5, 1.0])  # continuous at the replacement instant
    with pytest.raises(Exception, match=r"joint_names: expected a subset"):
        f.replace(msgs.joint_trajectory(t0, ["c"], [([1.0], [0.0], NS)]), t0 + NS)


def test_rclpy_transport_is_behind_a_guarded_import():
    import importlib.util

    mod = importlib.import_module("vlaflow.real.rclpy_node")  # importable without ROS 2
    if importlib.util.find_spec("rclpy") is None:
        with pytest.raises(ImportError, match="needs ROS 2"):
            mod.make_lifecycle_node("onnx:x", "panda_joints")
