"""The robot contract: one YAML file that ``vlaflow node``, ``vlaflow record`` and ``vlaflow sim-arm`` share.

It says which topics carry what (joint names and their order, camera topics and sizes, extra vectors such
as an end-effector or object state), how the policy's store keys are assembled from them, the control
rate, the command the robot accepts (``trajectory_msgs/JointTrajectory`` with positions + velocities and
``time_from_start``, or one ``std_msgs/Float64MultiArray`` per tick for a forward controller), QoS
overrides, the action limits the safety layer enforces, the workspace box and the staleness thresholds.
Training data recorded with a contract and deployment with the same contract agree on names and order.

Files ship in ``vlaflow/real/robots/`` (``panda_pick_place.yaml`` is the simulated arm); a name without a
path or ``.yaml`` is looked up there. Loading validates everything into frozen dataclasses: an unknown
field or a bad value is a :class:`~vlaflow.errors.ConfigError` naming the file and the field.

Observation layout (``observation:``): each store key maps to a list of ``<stream>.<name>`` references
(``<stream>.*`` = every name of that stream, in its order), concatenated into a float32 vector, or, for
``obs.image.<camera>``, to one image stream. :func:`check_policy` compares the assembled keys and shapes
with a policy's :class:`~vlaflow.interfaces.RuntimeSpec` and refuses a mismatch with one message listing
both sides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vlaflow.keys as K
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec

ROBOTS_DIR = Path(__file__).resolve().parent / "robots"

JOINT_STATE = "sensor_msgs/msg/JointState"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
FLOAT64_ARRAY = "std_msgs/msg/Float64MultiArray"
JOINT_TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
BOOL = "std_msgs/msg/Bool"
STRING = "std_msgs/msg/String"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"

STREAM_TYPES = (JOINT_STATE, IMAGE, COMPRESSED_IMAGE, FLOAT64_ARRAY)
COMMAND_TYPES = (JOINT_TRAJECTORY, FLOAT64_ARRAY)
ALIGNS = ("asof", "latest")  # asof: last sample stamped <= the frame time; latest: the newest received
WHEN_STALE = ("stop", "hold")  # stop: the frame is stale (the node holds); hold: use the old sample, counted
ACTION_KINDS = ("position", "delta", "gripper")  # absolute target | per-tick motion | open/close
QOS_PROFILES = ("sensor", "reliable", "latched")
IMAGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")


def ros_type(name: str, where: str) -> str:
    """'sensor_msgs/JointState' or 'sensor_msgs/msg/JointState' -> 'sensor_msgs/msg/JointState'."""
    parts = str(name).split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or parts[1] != "msg" or not all(parts):
        raise ConfigError(
            f"{where}: {name!r} is not a ROS 2 message type (expected 'pkg/Type' or 'pkg/msg/Type')"
        )
    return "/".join(parts)


# --------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class QosSpec:
    """ROS 2 QoS of one topic: a profile and, optionally, a different history depth."""

    profile: str = "sensor"  # sensor: best effort, keep last | reliable | latched: reliable + transient local
    depth: int = 1  # history depth (keep last N)

    def __post_init__(self):
        if self.profile not in QOS_PROFILES:
            raise ConfigError(f"qos.profile must be one of {QOS_PROFILES}, got {self.profile!r}")
        if self.depth < 1:
            raise ConfigError(f"qos.depth must be >= 1, got {self.depth}")


@dataclass(frozen=True)
class StreamSpec:
    """One input topic and how its samples are checked, buffered and aligned."""

    name: str  # the stream's name in observation references ("joints" in joints.panda_joint1)
    topic: str  # ROS topic, e.g. /joint_states
    type: str  # ROS message type (STREAM_TYPES)
    names: tuple[str, ...] = ()  # JointState: the joints used, in order; Float64MultiArray: value names
    extra_joints: str = "reject"  # JointState names beyond `names`: reject (drop the message) | ignore
    max_age_s: float = 0.25  # a sample older than this (capture stamp to frame time) is stale
    align: str = "asof"  # ALIGNS
    when_stale: str = "stop"  # WHEN_STALE
    future_tolerance_s: float = 0.05  # header stamps further ahead of the receive time are rejected
    height: int = 0  # images: expected height (0: any)
    width: int = 0  # images: expected width (0: any)
    encodings: tuple[str, ...] = ("rgb8", "bgr8")  # images: accepted encodings (converted to RGB)
    resize: tuple[int, int] | None = None  # images: (h, w) given to the policy; None: as received
    buffer: int = 32  # ring buffer length (samples)
    qos: QosSpec = field(default_factory=QosSpec)

    @property
    def is_image(self) -> bool:
        return self.type in (IMAGE, COMPRESSED_IMAGE)

    @property
    def has_header(self) -> bool:
        return self.type != FLOAT64_ARRAY

    def image_shape(self) -> tuple[int, int, int] | None:
        if not self.is_image:
            return None
        h, w = self.resize or (self.height, self.width)
        return (int(h), int(w), 3) if h and w else None


@dataclass(frozen=True)
class ControlSpec:
    """The node's clock."""

    rate_hz: float  # control ticks per second (the policy's fps)
    phase_lock: str | None = None  # stream whose newest capture stamp the tick clock locks to at engage
    phase_offset_s: float = 0.01  # ticks run this long after the locked stream's stamps


@dataclass(frozen=True)
class ActionSpec:
    """What each action dimension means and its limits (units of the action, per second)."""

    names: tuple[str, ...]  # one per action dim, in the policy's order
    kinds: tuple[str, ...]  # ACTION_KINDS per dim
    low: tuple[float, ...]  # lower limit per dim
    high: tuple[float, ...]  # upper limit per dim
    max_velocity: tuple[float, ...] | None = None  # |change| per second per dim (None: unlimited)
    max_acceleration: tuple[float, ...] | None = None  # |change of velocity| per second^2 (None: unlimited)
    state: tuple[str, ...] | None = None  # position dims: the measured value's <stream>.<name> (None: -)

    @property
    def dim(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class CommandSpec:
    """The command topic the node publishes (and the simulated arm obeys)."""

    topic: str
    type: str  # COMMAND_TYPES
    joint_names: tuple[
        str, ...
    ] = ()  # JointTrajectory: names of the action dims sent (default: action names)
    lookahead: int = 1  # JointTrajectory: scheduled points per message (1 = the next tick's target)
    qos: QosSpec = field(default_factory=lambda: QosSpec("reliable", 10))


@dataclass(frozen=True)
class WorkspaceSpec:
    """A box the end effector stays in: measured position + delta dims * scale is clamped into it."""

    position: tuple[str, str, str]  # <stream>.<name> of the measured x, y, z
    delta_dims: tuple[int, int, int]  # action dims that move x, y, z
    delta_scale: float  # metres per unit of those dims
    low: tuple[float, float, float]
    high: tuple[float, float, float]


@dataclass(frozen=True)
class SafetySpec:
    """Validation and watchdog thresholds; see :mod:`vlaflow.real.safety`."""

    position_margin: float = 0.0  # chunks must stay this far inside position limits (action units)
    max_first_action_distance: float | None = None  # position dims: |chunk[0] - measured| bound (None: -)
    engage_ramp_max_s: float = 3.0  # the engage ramp to the first action may take at most this long
    hold_decel_s: float = 0.3  # a hold brings motion to rest over at most this long
    heartbeat_topic: str | None = None  # a topic that must keep arriving (any message) while enabled
    heartbeat_timeout_s: float = 0.5
    workspace: WorkspaceSpec | None = None


@dataclass(frozen=True)
class TopicsSpec:
    """The node's own topics."""

    enable: str = "/vlaflow/enable"  # std_msgs/Bool, latched: True engages, False disengages
    estop: str = "/vlaflow/estop"  # std_msgs/Bool, latched: True latches the e-stop until restart
    diagnostics: str = "/diagnostics"  # diagnostic_msgs/DiagnosticArray at 1 Hz
    success: str = "/vlaflow/task_success"  # std_msgs/Bool from the simulated arm
    record: str = "/vlaflow/record"  # std_msgs/String: start | save | discard (the recorder)
    instruction: str = "/vlaflow/instruction"  # std_msgs/String, latched: the instruction text
    episode: str = "/vlaflow/episode"  # std_msgs/String: the simulated arm resets its scene ("reset:SEED")


@dataclass(frozen=True)
class RecordSpec:
    """What ``vlaflow record`` stores as the action."""

    action: tuple[str, ...] = ("command",)  # ("command",): the command topic; or <stream>.<name> refs


@dataclass(frozen=True)
class RobotContract:
    """A validated robot contract (see the module doc)."""

    name: str
    control: ControlSpec
    streams: dict[str, StreamSpec]
    observation: dict[str, tuple[str, ...]]  # store key -> refs (a vector) or (stream,) for an image
    action: ActionSpec
    command: CommandSpec
    safety: SafetySpec = field(default_factory=SafetySpec)
    topics: TopicsSpec = field(default_factory=TopicsSpec)
    record: RecordSpec = field(default_factory=RecordSpec)
    instruction: str = ""  # default instruction text
    source: str = ""  # the file it was read from

    @property
    def dt(self) -> float:
        return 1.0 / self.control.rate_hz

    def resolve(self, ref: str) -> tuple[str, int]:
        """'joints.panda_joint1' -> ('joints', index into that stream's names)."""
        stream, _, name = ref.partition(".")
        spec = self.streams[stream]
        return stream, spec.names.index(name)

    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for key, refs in self.observation.items():
            if K.is_image(key):
                shape = self.streams[refs[0]].image_shape()
                out[key] = shape if shape is not None else (0, 0, 3)
            else:
                out[key] = (len(refs),)
        return out

    def obs_names(self, key: str) -> list[str]:
        return [r.split(".", 1)[1] for r in self.observation[key]]


# --------------------------------------------------------------------------------------------- loading
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(data: Any, cls, where: str, skip: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    allowed = [n for n in _fields(cls) if n not in skip]
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {allowed}")
    return dict(data)


def _tuple(v: Any, where: str, kind=str, length: int | None = None) -> tuple:
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {v!r}")
    try:
        out = tuple(kind(x) for x in v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: expected a list of {kind.__name__}, got {v!r}") from e
    if length is not None and len(out) != length:
        raise ConfigError(f"{where}: expected {length} values, got {len(out)} ({list(v)})")
    return out


def _num(v: Any, where: str, low: float | None = None, integer: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if integer:
        ok = ok and float(v).is_integer()
    if not ok or (low is not None and v < low):
        bound = f" >= {low}" if low is not None else ""
        raise ConfigError(f"{where}: expected a{'n integer' if integer else ' number'}{bound}, got {v!r}")
    return int(v) if integer else float(v)


def _choice(v: Any, choices: tuple[str, ...], where: str) -> str:
    if v not in choices:
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {v!r}")
    return v


def _qos(data: Any, where: str, default: QosSpec) -> QosSpec:
    if data is None:
        return default
    d = _check_keys(data, QosSpec, where)
    profile = _choice(d.get("profile", default.profile), QOS_PROFILES, f"{where}.profile")
    return QosSpec(profile, _num(d.get("depth", default.depth), f"{where}.depth", 1, integer=True))


def _stream(name: str, data: Any, where: str) -> StreamSpec:
    d = _check_keys(data, StreamSpec, where, skip=("name",))
    for req in ("topic", "type"):
        if req not in d:
            raise ConfigError(f"{where}: missing field {req!r}")
    typ = ros_type(d["type"], f"{where}.type")
    if typ not in STREAM_TYPES:
        raise ConfigError(f"{where}.type: {typ} is not an input type; expected one of {list(STREAM_TYPES)}")
    topic = str(d["topic"])
    if not topic.startswith("/"):
        raise ConfigError(f"{where}.topic: expected an absolute topic '/name', got {topic!r}")
    names = _tuple(d.get("names", ()), f"{where}.names")
    if typ in (JOINT_STATE, FLOAT64_ARRAY) and not names:
        raise ConfigError(f"{where}.names: a {typ} stream needs the names of its values, in order")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.names: duplicate names in {list(names)}")
    resize = d.get("resize")
    spec = StreamSpec(
        name=name,
        topic=topic,
        type=typ,
        names=names,
        extra_joints=_choice(d.get("extra_joints", "reject"), ("reject", "ignore"), f"{where}.extra_joints"),
        max_age_s=_num(d.get("max_age_s", 0.25), f"{where}.max_age_s", 0.0),
        align=_choice(d.get("align", "asof"), ALIGNS, f"{where}.align"),
        when_stale=_choice(d.get("when_stale", "stop"), WHEN_STALE, f"{where}.when_stale"),
        future_tolerance_s=_num(d.get("future_tolerance_s", 0.05), f"{where}.future_tolerance_s", 0.0),
        height=_num(d.get("height", 0), f"{where}.height", 0, integer=True),
        width=_num(d.get("width", 0), f"{where}.width", 0, integer=True),
        encodings=tuple(
            _choice(e, IMAGE_ENCODINGS, f"{where}.encodings")
            for e in _tuple(d.get("encodings", ("rgb8", "bgr8")), f"{where}.encodings")
        ),
        resize=None if resize is None else _tuple(resize, f"{where}.resize", int, 2),
        buffer=_num(d.get("buffer", 32), f"{where}.buffer", 2, integer=True),
        qos=_qos(d.get("qos"), f"{where}.qos", QosSpec("sensor", 1)),
    )
    if spec.is_image and spec.image_shape() is None:
        raise ConfigError(f"{where}: an image stream needs height and width (or resize: [h, w])")
    return spec


def _refs(v: Any, streams: dict[str, StreamSpec], where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    out: list[str] = []
    for r in _tuple(v, where):
        stream, dot, name = r.partition(".")
        if stream not in streams:
            raise ConfigError(f"{where}: {r!r} names stream {stream!r}; the streams are {list(streams)}")
        spec = streams[stream]
        if not dot:
            out.append(stream)
        elif name == "*":
            out.extend(f"{stream}.{n}" for n in spec.names)
        elif name not in spec.names:
            raise ConfigError(f"{where}: {r!r}: stream {stream!r} has names {list(spec.names)}")
        else:
            out.append(r)
    return tuple(out)


def contract_from_dict(data: Any, source: str = "<dict>") -> RobotContract:
    """Validate a parsed contract (see the module doc); errors name ``source`` and the field."""
    d = _check_keys(data, RobotContract, source, skip=("source",))
    for req in ("name", "control", "streams", "observation", "action", "command"):
        if req not in d:
            raise ConfigError(f"{source}: missing field {req!r}")
    c = _check_keys(d["control"], ControlSpec, f"{source}: control")
    if "rate_hz" not in c:
        raise ConfigError(f"{source}: control.rate_hz is required")
    if not isinstance(d["streams"], dict) or not d["streams"]:
        raise ConfigError(f"{source}: streams must be a non-empty mapping of name -> stream")
    streams = {str(n): _stream(str(n), s, f"{source}: streams.{n}") for n, s in d["streams"].items()}
    control = ControlSpec(
        rate_hz=_num(c["rate_hz"], f"{source}: control.rate_hz", 1e-3),
        phase_lock=c.get("phase_lock"),
        phase_offset_s=_num(c.get("phase_offset_s", 0.01), f"{source}: control.phase_offset_s", 0.0),
    )
    if control.phase_lock is not None and control.phase_lock not in streams:
        raise ConfigError(
            f"{source}: control.phase_lock {control.phase_lock!r} is not a stream; streams: {list(streams)}"
        )
    if not isinstance(d["observation"], dict) or not d["observation"]:
        raise ConfigError(f"{source}: observation must map store keys to stream references")
    observation: dict[str, tuple[str, ...]] = {}
    for key, refs in d["observation"].items():
        where = f"{source}: observation.{key}"
        if not str(key).startswith(K.OBS_PREFIX):
            raise ConfigError(f"{where}: store keys of observations start with {K.OBS_PREFIX!r}")
        r = _refs(refs, streams, where)
        if K.is_image(key):
            if len(r) != 1 or "." in r[0] or not streams[r[0]].is_image:
                raise ConfigError(f"{where}: an image key maps to one image stream by name, got {list(r)}")
        elif any("." not in x for x in r):
            raise ConfigError(f"{where}: a vector key maps to <stream>.<name> references, got {list(r)}")
        observation[str(key)] = r
    action = _action(d["action"], streams, f"{source}: action")
    command = _command(d["command"], action, f"{source}: command")
    safety = _safety(d.get("safety"), streams, action, f"{source}: safety")
    topics = TopicsSpec(**_check_keys(d.get("topics", {}), TopicsSpec, f"{source}: topics"))
    rec = _check_keys(d.get("record", {}), RecordSpec, f"{source}: record")
    record = RecordSpec(RecordSpec().action)
    if "action" in rec:
        acts = (
            ("command",) if rec["action"] == "command" else _refs(rec["action"], streams, f"{source}: record")
        )
        if acts != ("command",) and len(acts) != action.dim:
            raise ConfigError(
                f"{source}: record.action has {len(acts)} values, the action has {action.dim} "
                f"({list(action.names)})"
            )
        record = RecordSpec(acts)
    return RobotContract(
        name=str(d["name"]),
        control=control,
        streams=streams,
        observation=observation,
        action=action,
        command=command,
        safety=safety,
        topics=topics,
        record=record,
        instruction=str(d.get("instruction", "")),
        source=source,
    )


def _action(data: Any, streams: dict[str, StreamSpec], where: str) -> ActionSpec:
    a = _check_keys(data, ActionSpec, where)
    for req in ("names", "kinds", "low", "high"):
        if req not in a:
            raise ConfigError(f"{where}: missing field {req!r}")
    names = _tuple(a["names"], f"{where}.names")
    n = len(names)
    kinds = tuple(
        _choice(k, ACTION_KINDS, f"{where}.kinds") for k in _tuple(a["kinds"], f"{where}.kinds", str, n)
    )
    low = _tuple(a["low"], f"{where}.low", float, n)
    high = _tuple(a["high"], f"{where}.high", float, n)
    bad = [names[i] for i in range(n) if not low[i] < high[i]]
    if bad:
        raise ConfigError(
            f"{where}: low must be < high for every dim; not for {bad} (low {low}, high {high})"
        )
    vel = a.get("max_velocity")
    acc = a.get("max_acceleration")
    vel = None if vel is None else _tuple(vel, f"{where}.max_velocity", float, n)
    acc = None if acc is None else _tuple(acc, f"{where}.max_acceleration", float, n)
    for label, vals in (("max_velocity", vel), ("max_acceleration", acc)):
        if vals is not None and any(not v > 0 for v in vals):
            raise ConfigError(f"{where}.{label}: every value must be > 0, got {list(vals)}")
    state = a.get("state")
    if state is not None:
        state = _refs(state, streams, f"{where}.state")
        if len(state) != n:
            raise ConfigError(f"{where}.state: {len(state)} references for {n} action dims ({list(names)})")
    if "position" in kinds and state is None:
        raise ConfigError(
            f"{where}: position dims {[names[i] for i in range(n) if kinds[i] == 'position']} need "
            "action.state (the measured value of each dim) for the engage ramp and the first-action check"
        )
    return ActionSpec(names, kinds, low, high, vel, acc, state)


def _command(data: Any, action: ActionSpec, where: str) -> CommandSpec:
    c = _check_keys(data, CommandSpec, where)
    for req in ("topic", "type"):
        if req not in c:
            raise ConfigError(f"{where}: missing field {req!r}")
    typ = ros_type(c["type"], f"{where}.type")
    if typ not in COMMAND_TYPES:
        raise ConfigError(f"{where}.type: expected one of {list(COMMAND_TYPES)}, got {typ}")
    joint_names = _tuple(c.get("joint_names", action.names), f"{where}.joint_names", str, action.dim)
    if typ == JOINT_TRAJECTORY and "delta" in action.kinds:
        raise ConfigError(
            f"{where}: a JointTrajectory carries positions; the action has delta dims {action.kinds}"
        )
    return CommandSpec(
        topic=str(c["topic"]),
        type=typ,
        joint_names=joint_names,
        lookahead=_num(c.get("lookahead", 1), f"{where}.lookahead", 1, integer=True),
        qos=_qos(c.get("qos"), f"{where}.qos", QosSpec("reliable", 10)),
    )


def _safety(data: Any, streams: dict[str, StreamSpec], action: ActionSpec, where: str) -> SafetySpec:
    if data is None:
        return SafetySpec()
    s = _check_keys(data, SafetySpec, where)
    ws = None
    if s.get("workspace") is not None:
        w = _check_keys(s["workspace"], WorkspaceSpec, f"{where}.workspace")
        missing = [k for k in ("position", "delta_dims", "delta_scale", "low", "high") if k not in w]
        if missing:
            raise ConfigError(f"{where}.workspace: missing field(s) {missing}")
        pos = _refs(w["position"], streams, f"{where}.workspace.position")
        if len(pos) != 3:
            raise ConfigError(f"{where}.workspace.position: expected 3 references (x, y, z), got {list(pos)}")
        dims = _tuple(w["delta_dims"], f"{where}.workspace.delta_dims", int, 3)
        if any(not 0 <= i < action.dim or action.kinds[i] != "delta" for i in dims):
            raise ConfigError(
                f"{where}.workspace.delta_dims: {list(dims)} must be delta dims of {action.kinds}"
            )
        ws = WorkspaceSpec(
            pos,
            dims,
            _num(w["delta_scale"], f"{where}.workspace.delta_scale", 0.0),
            _tuple(w["low"], f"{where}.workspace.low", float, 3),
            _tuple(w["high"], f"{where}.workspace.high", float, 3),
        )
    hb = s.get("heartbeat_topic")
    mfd = s.get("max_first_action_distance")
    return SafetySpec(
        position_margin=_num(s.get("position_margin", 0.0), f"{where}.position_margin", 0.0),
        max_first_action_distance=None
        if mfd is None
        else _num(mfd, f"{where}.max_first_action_distance", 0.0),
        engage_ramp_max_s=_num(s.get("engage_ramp_max_s", 3.0), f"{where}.engage_ramp_max_s", 0.0),
        hold_decel_s=_num(s.get("hold_decel_s", 0.3), f"{where}.hold_decel_s", 0.0),
        heartbeat_topic=None if hb is None else str(hb),
        heartbeat_timeout_s=_num(s.get("heartbeat_timeout_s", 0.5), f"{where}.heartbeat_timeout_s", 1e-3),
        workspace=ws,
    )


def load_contract(path_or_name: str | Path) -> RobotContract:
    """Read a contract file, or a shipped one by name (``panda_pick_place``)."""
    import yaml

    p = Path(path_or_name)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1:
        p = ROBOTS_DIR / f"{p.name}.yaml"
    if not p.is_file():
        shipped = sorted(x.stem for x in ROBOTS_DIR.glob("*.yaml"))
        raise ConfigError(f"robot contract {str(path_or_name)!r} not found; shipped contracts: {shipped}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    return contract_from_dict(data, str(p))


def check_policy(contract: RobotContract, spec: RuntimeSpec, policy: str = "policy") -> None:
    """Refuse a policy whose observation keys / shapes or action dim the contract cannot provide.

    One message lists both sides (what the policy needs, what the contract assembles) and each mismatch.
    """
    have = contract.obs_shapes()
    problems = []
    for k, shape in spec.obs_shapes.items():
        if k not in have:
            problems.append(f"{k} is not mapped by the contract's observation")
        elif tuple(have[k]) != tuple(shape):
            problems.append(f"{k}: the policy needs {tuple(shape)}, the contract assembles {tuple(have[k])}")
    if spec.action_dim != contract.action.dim:
        problems.append(
            f"action: the policy gives {spec.action_dim} dims, the contract has {contract.action.dim}"
        )
    if abs(float(spec.fps) - contract.control.rate_hz) > 1e-6:
        problems.append(
            f"rate: the policy was trained at {spec.fps} Hz, the contract runs {contract.control.rate_hz} Hz"
        )
    if not problems:
        return

    def fmt(shapes: dict) -> str:
        return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) or "(none)"

    raise ConfigError(
        f"robot contract {contract.source or contract.name} does not fit {policy}:\n"
        f"  policy needs:       {fmt(spec.obs_shapes)}; action dim {spec.action_dim}; {spec.fps} Hz\n"
        f"  contract assembles: {fmt(have)}; action dim {contract.action.dim} {list(contract.action.names)}; "
        f"{contract.control.rate_hz} Hz\n  mismatch: " + "; ".join(problems)
    )
