"""ROS 2 messages, transport-free: the official definitions (from the ``rosbags`` typestore), constructors,
CDR encoding / decoding and the checks every incoming message passes.

In memory a message is an instance of the typestore's class for its type (a dataclass whose numeric
sequences are numpy arrays), whatever carried it: the CycloneDDS transport decodes the bytes it takes
off the wire with :func:`decode_cdr`, rclpy hands over its own objects (converted field by field), the
in-process bus of the tests passes them through. The same definitions generate the DDS types
(:mod:`vlaflow.real.dds`), so names, field order and types are the ROS 2 ones.

A message that does not fit its stream (wrong joint count, unknown joint names, a non-finite value, a
zero / non-monotonic / future stamp, an image of the wrong size or encoding) raises :class:`Rejected`
naming topic, field, expected and found; the node counts it per topic and keeps running.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlaflow.real.contract import (
    BOOL,
    COMPRESSED_IMAGE,
    DIAGNOSTIC_ARRAY,
    FLOAT64_ARRAY,
    IMAGE,
    JOINT_STATE,
    JOINT_TRAJECTORY,
    STRING,
    StreamSpec,
)

# Every type the real layer puts on or takes off the wire (and their nested types, generated on demand).
WIRE_TYPES = (
    JOINT_STATE,
    IMAGE,
    COMPRESSED_IMAGE,
    JOINT_TRAJECTORY,
    FLOAT64_ARRAY,
    BOOL,
    STRING,
    DIAGNOSTIC_ARRAY,
    "builtin_interfaces/msg/Time",
)
NS = 1_000_000_000


@functools.cache
def typestore():
    """The ROS 2 Humble typestore of ``rosbags`` (these definitions are unchanged from Humble to Jazzy)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def cls(msgtype: str):
    return typestore().types[msgtype]


def encode_cdr(msg: Any, msgtype: str) -> bytes:
    """XCDR1 little endian with the 4-byte encapsulation header, as rmw_cyclonedds_cpp serializes."""
    return bytes(typestore().serialize_cdr(msg, msgtype))


def decode_cdr(raw: bytes | memoryview, msgtype: str) -> Any:
    return typestore().deserialize_cdr(bytes(raw), msgtype)


class Rejected(Exception):
    """An incoming message does not fit its stream; ``str()`` names topic, field, expected and found."""

    def __init__(self, topic: str, field: str, expected: str, found: str):
        self.topic, self.field, self.expected, self.found = topic, field, expected, found
        super().__init__(f"{topic}: {field}: expected {expected}, found {found}")

    @property
    def reason(self) -> str:
        return self.field


# --------------------------------------------------------------------------------------------- building
def time_msg(t_ns: int):
    return cls("builtin_interfaces/msg/Time")(sec=int(t_ns // NS), nanosec=int(t_ns % NS))


def duration_msg(t_ns: int):
    return cls("builtin_interfaces/msg/Duration")(sec=int(t_ns // NS), nanosec=int(t_ns % NS))


def header(t_ns: int, frame_id: str = ""):
    return cls("std_msgs/msg/Header")(stamp=time_msg(t_ns), frame_id=frame_id)


def stamp_ns(msg: Any) -> int | None:
    h = getattr(msg, "header", None)
    return None if h is None else int(h.stamp.sec) * NS + int(h.stamp.nanosec)


def _f64(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))


def joint_state(t_ns: int, names, position, velocity=(), effort=(), frame_id: str = ""):
    return cls(JOINT_STATE)(
        header=header(t_ns, frame_id),
        name=list(names),
        position=_f64(position),
        velocity=_f64(velocity),
        effort=_f64(effort),
    )


def float64_array(values, label: str = ""):
    values = _f64(values)
    dims = [cls("std_msgs/msg/MultiArrayDimension")(label=label, size=len(values), stride=len(values))]
    layout = cls("std_msgs/msg/MultiArrayLayout")(dim=dims if label else [], data_offset=0)
    return cls(FLOAT64_ARRAY)(layout=layout, data=values)


def image(t_ns: int, rgb: np.ndarray, encoding: str = "rgb8", frame_id: str = ""):
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    ch = 1 if rgb.ndim == 2 else rgb.shape[2]
    return cls(IMAGE)(
        header=header(t_ns, frame_id),
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=w * ch,
        data=rgb.reshape(-1),
    )


def compressed_image(t_ns: int, rgb: np.ndarray, fmt: str = "png", frame_id: str = ""):
    import cv2

    ok, buf = cv2.imencode(f".{fmt}", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError(f"cv2 could not encode a {rgb.shape} image as {fmt}")
    return cls(COMPRESSED_IMAGE)(header=header(t_ns, frame_id), format=fmt, data=buf.reshape(-1))


def joint_trajectory(t_ns: int, names, points: list[tuple[np.ndarray, np.ndarray, int]]):
    """``points``: (positions, velocities, time_from_start ns) per point."""
    pt = cls("trajectory_msgs/msg/JointTrajectoryPoint")
    empty = np.zeros(0, dtype=np.float64)
    return cls(JOINT_TRAJECTORY)(
        header=header(t_ns),
        joint_names=list(names),
        points=[
            pt(
                positions=_f64(p),
                velocities=_f64(v),
                accelerations=empty,
                effort=empty,
                time_from_start=duration_msg(dt),
            )
            for p, v, dt in points
        ],
    )


def bool_msg(value: bool):
    return cls(BOOL)(data=bool(value))


def string_msg(text: str):
    return cls(STRING)(data=str(text))


def diagnostic_array(t_ns: int, name: str, level: int, message: str, values: dict[str, Any], hardware_id=""):
    kv = cls("diagnostic_msgs/msg/KeyValue")
    status = cls("diagnostic_msgs/msg/DiagnosticStatus")(
        level=int(level),
        name=name,
        message=message,
        hardware_id=hardware_id,
        values=[kv(key=str(k), value=str(v)) for k, v in values.items()],
    )
    return cls(DIAGNOSTIC_ARRAY)(header=header(t_ns), status=[status])


# --------------------------------------------------------------------------------------------- checking
@dataclass
class StampCheck:
    """Per-stream stamp state: the last accepted capture stamp (stamps must not go backwards)."""

    last_ns: int | None = None


def check_stamp(msg: Any, spec: StreamSpec, recv_ns: int, state: StampCheck) -> int:
    """The capture stamp (ns): the header's, or the receive time for headerless types; checked."""
    if not spec.has_header:
        t = recv_ns
    else:
        t = stamp_ns(msg)
        if not t:
            raise Rejected(spec.topic, "header.stamp", "a capture time", "a zero stamp")
        if t - recv_ns > spec.future_tolerance_s * NS:
            raise Rejected(
                spec.topic,
                "header.stamp",
                f"<= receive time + {spec.future_tolerance_s} s",
                f"{(t - recv_ns) / NS:.3f} s in the future",
            )
    if state.last_ns is not None and t < state.last_ns:
        raise Rejected(
            spec.topic,
            "header.stamp",
            f">= the previous stamp {state.last_ns} ns",
            f"{t} ns (went backwards)",
        )
    return t


def _finite(values: np.ndarray, topic: str, field: str, names=None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        j = int(np.argmax(bad))
        at = f"{names[j]!r}" if names is not None and j < len(names) else f"index {j}"
        raise Rejected(topic, field, "finite values", f"{values[j]} at {at}")


def decode_joint_state(msg: Any, spec: StreamSpec) -> np.ndarray:
    """Positions of ``spec.names`` in contract order (float64)."""
    names = list(msg.name)
    pos = np.asarray(msg.position, dtype=np.float64)
    if len(names) != len(pos):
        raise Rejected(spec.topic, "position", f"one value per name ({len(names)})", f"{len(pos)} values")
    unknown = [n for n in names if n not in spec.names]
    if unknown and spec.extra_joints == "reject":
        raise Rejected(spec.topic, "name", f"joints {list(spec.names)}", f"unknown joint(s) {unknown}")
    missing = [n for n in spec.names if n not in names]
    if missing:
        raise Rejected(spec.topic, "name", f"joints {list(spec.names)}", f"{names} (missing {missing})")
    index = {n: i for i, n in enumerate(names)}
    out = pos[[index[n] for n in spec.names]]
    _finite(out, spec.topic, "position", spec.names)
    return out


def decode_float64_array(msg: Any, spec: StreamSpec) -> np.ndarray:
    data = np.asarray(msg.data, dtype=np.float64)
    if data.shape != (len(spec.names),):
        raise Rejected(
            spec.topic, "data", f"{len(spec.names)} values ({list(spec.names)})", f"{data.size} values"
        )
    _finite(data, spec.topic, "data", spec.names)
    return data


_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


def decode_image(msg: Any, spec: StreamSpec, msgtype: str = IMAGE) -> np.ndarray:
    """uint8 (h, w, 3) RGB, checked against the stream's size and encodings, resized if the contract says."""
    if msgtype == COMPRESSED_IMAGE:
        import cv2

        buf = np.asarray(msg.data, dtype=np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if img is None:
            raise Rejected(
                spec.topic, "data", f"a decodable {msg.format!r} image", f"{buf.size} undecodable bytes"
            )
        img = np.ascontiguousarray(img[:, :, ::-1])
    else:
        enc = msg.encoding
        if enc not in spec.encodings:
            raise Rejected(spec.topic, "encoding", f"one of {list(spec.encodings)}", repr(enc))
        h, w, ch, step = int(msg.height), int(msg.width), _CHANNELS[enc], int(msg.step)
        data = np.asarray(msg.data, dtype=np.uint8)
        if step < w * ch or data.size < h * step:
            raise Rejected(
                spec.topic,
                "data",
                f"{h * max(step, w * ch)} bytes for {h}x{w} {enc} (step {step})",
                f"{data.size}",
            )
        img = data[: h * step].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
        if enc in ("bgr8", "bgra8"):
            img = img[:, :, 2::-1]
        elif ch == 4:
            img = img[:, :, :3]
        elif ch == 1:
            img = np.repeat(img, 3, axis=2)
        img = np.ascontiguousarray(img)
    if (spec.height and img.shape[0] != spec.height) or (spec.width and img.shape[1] != spec.width):
        raise Rejected(
            spec.topic, "height x width", f"{spec.height}x{spec.width}", f"{img.shape[0]}x{img.shape[1]}"
        )
    if spec.resize and tuple(img.shape[:2]) != tuple(spec.resize):
        import cv2

        h, w = spec.resize
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img


def decode_stream(msg: Any, spec: StreamSpec) -> np.ndarray:
    """The value a stream sample contributes to frames (see the decode_* functions)."""
    if spec.type == JOINT_STATE:
        return decode_joint_state(msg, spec)
    if spec.type == FLOAT64_ARRAY:
        return decode_float64_array(msg, spec)
    return decode_image(msg, spec, spec.type)
