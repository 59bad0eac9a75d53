"""CycloneDDS transport with ROS 2 wire names, types and QoS: a ROS 2 node on rmw_cyclonedds_cpp talks to it.

What makes it ROS 2 on the wire:

- topic names ``rt/<topic>`` (``/joint_states`` -> ``rt/joint_states``);
- type names ``<pkg>::msg::dds_::<Type>_``, structures generated from the official ``.msg`` definitions
  in the ``rosbags`` typestore (:func:`idl_type`), *final* extensibility, ``byte`` and ``char`` as uint8,
  exactly as rmw_cyclonedds_cpp builds its dynamic types;
- data representation XCDR1 (plain CDR, little endian: encapsulation header ``00 01 00 00``), the payload
  zero-padded to a multiple of 4 bytes, as rmw_cyclonedds_cpp serializes;
- QoS: ``sensor`` best effort + keep last N, ``reliable`` reliable + keep last N, ``latched`` reliable +
  transient local + keep last N (durability volatile otherwise).

Publishing serializes with CycloneDDS's own serializer from the generated type; receiving takes the raw
CDR bytes off the reader (so a malformed payload is counted, not raised inside the reader, and recorders
keep the exact bytes) and decodes them with the typestore (:func:`vlaflow.real.msgs.decode_cdr`).

Network: :func:`loopback_config` is the configuration every test and the CLI default to: interface
``lo``, no multicast, unicast discovery to peer 127.0.0.1 (participant indices probed on the loopback
ports). Set ``CYCLONEDDS_URI`` yourself for a robot's network; :func:`use_loopback` sets it only when
unset.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from vlaflow.real.contract import QosSpec
from vlaflow.real.msgs import Rejected, decode_cdr, typestore
from vlaflow.real.transport import Callback, ErrorCallback, Received, now_ns

LOOPBACK_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<CycloneDDS xmlns="https://cdds.io/config">
  <Domain id="any">
    <General>
      <Interfaces><NetworkInterface name="lo"/></Interfaces>
      <AllowMulticast>false</AllowMulticast>
    </General>
    <Discovery>
      <ParticipantIndex>auto</ParticipantIndex>
      <MaxAutoParticipantIndex>{max_participants}</MaxAutoParticipantIndex>
      <Peers><Peer address="127.0.0.1"/></Peers>
    </Discovery>
  </Domain>
</CycloneDDS>"""


def loopback_config(max_participants: int = 16) -> str:
    """CycloneDDS XML for loopback only (see the module doc); a value for ``CYCLONEDDS_URI``."""
    return LOOPBACK_XML.format(max_participants=int(max_participants))


def use_loopback() -> None:
    """Set ``CYCLONEDDS_URI`` to the loopback configuration unless the user has set it (before DDS starts)."""
    os.environ.setdefault("CYCLONEDDS_URI", loopback_config())


def wire_topic(topic: str) -> str:
    """The DDS topic name ROS 2 uses for ``topic``."""
    return "rt/" + topic.lstrip("/")


def dds_type_name(msgtype: str) -> str:
    pkg, kind, name = msgtype.split("/")
    return f"{pkg}::{kind}::dds_::{name}_"


# --------------------------------------------------------------------------------------------- types
def _base_types() -> dict[str, Any]:
    from cyclonedds.idl import types as T

    # byte and char are uint8 in rmw_cyclonedds_cpp's dynamic types
    return {
        "bool": bool,
        "byte": T.uint8,
        "char": T.uint8,
        "int8": T.int8,
        "uint8": T.uint8,
        "int16": T.int16,
        "uint16": T.uint16,
        "int32": T.int32,
        "uint32": T.uint32,
        "int64": T.int64,
        "uint64": T.uint64,
        "float32": T.float32,
        "float64": T.float64,
        "string": str,
    }


@functools.cache
def idl_type(msgtype: str):
    """The CycloneDDS IdlStruct of a ROS 2 message type, generated from its typestore definition."""
    from cyclonedds.idl import make_idl_struct
    from cyclonedds.idl import types as T
    from rosbags.typesys.store import Nodetype

    base = _base_types()

    def field_type(node):
        kind, spec = node
        if kind == Nodetype.BASE:
            name, bound = spec
            return T.bounded_str[bound] if name == "string" and bound else base[name]
        if kind == Nodetype.NAME:
            return idl_type(spec)
        sub, n = spec
        if kind == Nodetype.ARRAY:
            return T.array[field_type(sub), n]
        return T.sequence[field_type(sub), n] if n else T.sequence[field_type(sub)]

    _, fields = typestore().fielddefs[msgtype]
    members = {name: field_type(node) for name, node in fields}
    if not members:  # an empty ROS message has one uint8 on the wire, as in rosidl
        members = {"structure_needs_at_least_one_member": T.uint8}
    return make_idl_struct(msgtype.split("/")[-1], dds_type_name(msgtype), members)


@functools.cache
def _converter(msgtype: str):
    """A function typestore message -> IdlStruct instance (numpy sequences to lists / bytes)."""
    from rosbags.typesys.store import Nodetype

    cls = idl_type(msgtype)
    _, fields = typestore().fielddefs[msgtype]
    plan = []
    for name, (kind, spec) in fields:
        if kind == Nodetype.BASE:
            plan.append((name, None))
        elif kind == Nodetype.NAME:
            plan.append((name, _converter(spec)))
        else:
            (sub_kind, sub_spec), _n = spec
            if sub_kind == Nodetype.NAME:
                conv = _converter(sub_spec)
                plan.append((name, lambda v, c=conv: [c(x) for x in v]))
            elif sub_spec[0] == "string":
                plan.append((name, list))
            elif sub_spec[0] in ("uint8", "byte", "char"):
                plan.append((name, lambda v: bytes(memoryview(v)) if hasattr(v, "__array__") else bytes(v)))
            else:
                plan.append((name, lambda v: v.tolist() if hasattr(v, "tolist") else list(v)))

    def convert(msg):
        kw = {}
        for name, fn in plan:
            v = getattr(msg, name)
            kw[name] = v if fn is None else fn(v)
        if not plan:
            kw["structure_needs_at_least_one_member"] = 0
        return cls(**kw)

    return convert


def to_idl(msg: Any, msgtype: str):
    return _converter(msgtype)(msg)


def dds_qos(spec: QosSpec):
    from cyclonedds.qos import Policy, Qos

    policies = [Policy.History.KeepLast(spec.depth), Policy.DataRepresentation(use_cdrv0_representation=True)]
    if spec.profile == "sensor":
        policies.append(Policy.Reliability.BestEffort)
        policies.append(Policy.Durability.Volatile)
    else:
        from cyclonedds.util import duration

        policies.append(Policy.Reliability.Reliable(duration(milliseconds=100)))
        latched = spec.profile == "latched"
        policies.append(Policy.Durability.TransientLocal if latched else Policy.Durability.Volatile)
    return Qos(*policies)


# --------------------------------------------------------------------------------------------- transport
class DdsPublisher:
    def __init__(self, writer, msgtype: str, topic: str):
        self.writer, self.msgtype, self.topic = writer, msgtype, topic
        self._convert = _converter(msgtype)

    def publish(self, msg: Any) -> None:
        self.writer.write(self._convert(msg))

    def publish_raw(self, raw: bytes) -> None:
        """Write serialized bytes as they are (tests inject malformed or foreign payloads)."""
        from cyclonedds._clayer import ddspy_write

        raw = bytes(raw).ljust((len(raw) + 3) & ~3, b"\0")
        ret = ddspy_write(self.writer._ref, raw)
        if ret < 0:
            raise RuntimeError(f"dds write on {self.topic} failed with code {ret}")


class DdsTransport:
    """The CycloneDDS transport (see the module doc); one participant, one receive thread.

    The receive thread blocks in a WaitSet (it releases the GIL), takes the raw samples of every reader
    that has some, and calls the subscribers' callbacks with the receive time (ROS clock: system time).
    """

    def __init__(self, domain_id: int = 0):
        from cyclonedds.core import GuardCondition, WaitSet
        from cyclonedds.domain import DomainParticipant

        use_loopback()
        self.domain_id = domain_id
        self.dp = DomainParticipant(domain_id)
        self._topics: dict[str, Any] = {}
        self._readers: dict[int, tuple] = {}  # condition handle -> (reader, topic, msgtype, cb, err)
        self._conditions = []
        self._lock = threading.Lock()
        self._waitset = WaitSet(self.dp)
        self._wake = GuardCondition(self.dp)
        self._waitset.attach(self._wake)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlaflow-dds-recv", daemon=True)
        self._thread.start()
        self.decode_errors = 0

    def now_ns(self) -> int:
        return now_ns()

    def _topic(self, topic: str, msgtype: str):
        from cyclonedds.topic import Topic

        name = wire_topic(topic)
        with self._lock:
            if name not in self._topics:
                self._topics[name] = (Topic(self.dp, name, idl_type(msgtype)), msgtype)
            t, typ = self._topics[name]
        if typ != msgtype:
            raise ValueError(f"topic {topic} is already used with type {typ}, not {msgtype}")
        return t

    def subscribe(
        self,
        topic: str,
        msgtype: str,
        qos: QosSpec,
        callback: Callback,
        on_error: ErrorCallback | None = None,
    ) -> None:  # noqa: E501
        from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState
        from cyclonedds.sub import DataReader

        reader = DataReader(self.dp, self._topic(topic, msgtype), qos=dds_qos(qos))
        cond = ReadCondition(reader, SampleState.Any | ViewState.Any | InstanceState.Any)
        with self._lock:
            self._readers[cond._ref] = (reader, topic, msgtype, callback, on_error)
            self._conditions.append(cond)
        self._waitset.attach(cond)
        self._wake.set(True)

    def publisher(self, topic: str, msgtype: str, qos: QosSpec) -> DdsPublisher:
        from cyclonedds.pub import DataWriter

        writer = DataWriter(self.dp, self._topic(topic, msgtype), qos=dds_qos(qos))
        return DdsPublisher(writer, msgtype, topic)

    def _run(self) -> None:
        from cyclonedds._clayer import ddspy_take
        from cyclonedds.core import InstanceState, SampleState, ViewState
        from cyclonedds.util import duration

        mask = SampleState.Any | ViewState.Any | InstanceState.Any
        timeout = duration(milliseconds=200)
        while not self._stop.is_set():
            self._waitset.wait(timeout)
            self._wake.set(False)
            with self._lock:
                readers = list(self._readers.values())
            for reader, topic, msgtype, cb, err in readers:
                while True:
                    samples = ddspy_take(reader._ref, mask, 64)
                    if isinstance(samples, int) or not samples:
                        break
                    t = now_ns()
                    for raw, info in samples:
                        if not info.valid_data:
                            continue
                        self._dispatch(topic, msgtype, raw, t, cb, err)

    def _dispatch(self, topic, msgtype, raw, t, cb, err) -> None:
        try:
            msg = decode_cdr(raw, msgtype)
        except Exception as e:  # truncated / foreign payloads: counted, the node keeps running
            self.decode_errors += 1
            if err is not None:
                err(Rejected(topic, "cdr", f"a serialized {msgtype}", f"{type(e).__name__}: {e}"))
            return
        cb(Received(msg, t, bytes(raw)))

    def close(self) -> None:
        self._stop.set()
        self._wake.set(True)
        self._thread.join(timeout=2.0)
