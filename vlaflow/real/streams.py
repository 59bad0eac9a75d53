"""Stamped ring buffers per input stream and the observation frames assembled from them.

Each sample keeps two stamps: *capture* (the message's ``header.stamp``; the receive time for headerless
types such as Float64MultiArray) and *receive* (when the transport handed it over). A frame at time t
takes from every stream the sample its alignment names: ``asof`` the last sample captured at or before t,
``latest`` the newest received. Its *age* is t minus its capture stamp. A stream whose sample is older
than its ``max_age_s`` (or that has none) is stale: with ``when_stale: stop`` the frame is stale (the node
stops requesting chunks and holds), with ``hold`` the old sample is used and the hold is counted.

Buffers are filled by the transport's receive thread and read by the control tick; each has its own lock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.real.contract import RobotContract, StreamSpec
from vlaflow.real.msgs import NS, Rejected, StampCheck, check_stamp, decode_stream


@dataclass(frozen=True)
class Sample:
    capture_ns: int
    recv_ns: int
    value: np.ndarray


class StreamBuffer:
    """The last ``spec.buffer`` accepted samples of one stream, with its reject counters."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self._ring: deque[Sample] = deque(maxlen=spec.buffer)
        self._lock = threading.Lock()
        self._stamps = StampCheck()
        self.received = 0
        self.rejected: dict[str, int] = {}  # field -> count
        self.last_reject: str | None = None

    def push(self, msg: Any, recv_ns: int) -> bool:
        """Check and decode ``msg``; False (counted, ``last_reject`` says why) when it is dropped."""
        self.received += 1
        try:
            with self._lock:
                t = check_stamp(msg, self.spec, recv_ns, self._stamps)
                value = decode_stream(msg, self.spec)
                self._stamps.last_ns = t
                self._ring.append(Sample(t, recv_ns, value))
            return True
        except Rejected as e:
            self.reject(e)
            return False

    def reject(self, e: Rejected) -> None:
        self.rejected[e.field] = self.rejected.get(e.field, 0) + 1
        self.last_reject = str(e)

    def at(self, t_ns: int) -> Sample | None:
        with self._lock:
            if not self._ring:
                return None
            if self.spec.align == "latest":
                return self._ring[-1]
            for s in reversed(self._ring):
                if s.capture_ns <= t_ns:
                    return s
            return None

    def newest(self) -> Sample | None:
        with self._lock:
            return self._ring[-1] if self._ring else None

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()

    def counters(self) -> dict:
        return {
            "received": self.received,
            "rejected": sum(self.rejected.values()),
            "rejected_by_field": dict(self.rejected),
            "last_reject": self.last_reject,
        }


@dataclass
class Frame:
    """One observation frame at ``t_ns``: store-keyed arrays, each stream's sample and age."""

    t_ns: int
    obs: dict[str, np.ndarray]
    samples: dict[str, Sample | None]
    ages_s: dict[str, float | None]
    stale: list[str] = field(default_factory=list)  # streams that make the frame stale
    held: list[str] = field(default_factory=list)  # stale streams used anyway (when_stale: hold)

    @property
    def ok(self) -> bool:
        return not self.stale

    def value(self, ref: str, contract: RobotContract) -> float:
        stream, i = contract.resolve(ref)
        s = self.samples[stream]
        return float("nan") if s is None else float(s.value[i])


class FrameBuilder:
    """Observation frames for the store keys ``keys`` (and the streams ``extra`` refs need) from buffers."""

    def __init__(
        self, contract: RobotContract, keys: list[str] | tuple[str, ...], extra: tuple[str, ...] = ()
    ):
        self.contract = contract
        self.keys = tuple(keys)
        missing = [k for k in self.keys if k not in contract.observation]
        if missing:
            raise KeyError(
                f"keys {missing} are not in the contract's observation {list(contract.observation)}"
            )
        needed: list[str] = []
        for k in self.keys:
            for r in contract.observation[k]:
                s = r.split(".", 1)[0]
                if s not in needed:
                    needed.append(s)
        for r in extra:
            s = r.split(".", 1)[0]
            if s not in needed:
                needed.append(s)
        self.streams = tuple(needed)  # the streams frames depend on
        self.buffers = {name: StreamBuffer(contract.streams[name]) for name in contract.streams}
        self._index = {
            k: [contract.resolve(r) for r in contract.observation[k]] for k in self.keys if not K.is_image(k)
        }
        self.stale_frames = 0  # frames that were stale
        self.held_samples = 0  # stale samples used under when_stale: hold

    def frame(self, t_ns: int) -> Frame:
        samples: dict[str, Sample | None] = {}
        ages: dict[str, float | None] = {}
        stale, held = [], []
        for name in self.streams:
            spec = self.contract.streams[name]
            s = self.buffers[name].at(t_ns)
            samples[name] = s
            ages[name] = None if s is None else (t_ns - s.capture_ns) / NS
            if s is None or ages[name] > spec.max_age_s:
                (held if spec.when_stale == "hold" and s is not None else stale).append(name)
        obs: dict[str, np.ndarray] = {}
        if not stale:
            for k in self.keys:
                if K.is_image(k):
                    obs[k] = samples[self.contract.observation[k][0]].value
                else:
                    obs[k] = np.array([samples[s].value[i] for s, i in self._index[k]], dtype=np.float32)
        if stale:
            self.stale_frames += 1
        self.held_samples += len(held)
        return Frame(t_ns, obs, samples, ages, stale, held)

    def counters(self) -> dict[str, dict]:
        return {self.contract.streams[n].topic: b.counters() for n, b in self.buffers.items()}
