"""Teleop recording from topics into the episode store (``vlaflow record``), optionally with a rosbag2 MCAP.

While an episode records, every accepted message of the streams the contract's observation uses, and of
the action source (the command topic, e.g. what a teleop device or a leader arm sends the follower, or
``record.action`` references such as a leader arm's JointState), is buffered with its receive time and raw
CDR bytes. ``save`` turns the buffer into one episode: ticks at the control rate from the first time every
topic has a sample to the last time every topic still has one, each topic's as-of sample at each tick
(capture stamp = ``header.stamp``, the receive time for headerless types), exactly the alignment of
``vlaflow ingest --format rosbag2`` (its functions do it), so the MCAP written beside the store ingests to
the same arrays. Messages a stream rejects (:mod:`vlaflow.real.msgs`) are counted and kept out of both.

Commands (``std_msgs/String`` on the contract's record topic, or keys): ``start`` (a new episode; a
running one is discarded), ``save`` (append it: the store's appends are crash-safe, so a recorder killed
mid-episode leaves every saved episode intact), ``discard``. The instruction text is the latched
instruction topic's, else ``--task``, else the contract's.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import vlaflow.keys as K
from vlaflow.atomic import temp_sibling
from vlaflow.data.ingest.rosbag2 import asof_indices, plan_episodes
from vlaflow.errors import VlaflowError
from vlaflow.real.contract import (
    FLOAT64_ARRAY,
    JOINT_TRAJECTORY,
    STRING,
    QosSpec,
    RobotContract,
)
from vlaflow.real.msgs import Rejected, StampCheck, check_stamp, decode_stream, stamp_ns
from vlaflow.real.transport import Received

ACTION_STREAM = "__action__"


@dataclass
class _Topic:
    topic: str
    msgtype: str
    spec: Any  # StreamSpec or None (the command topic)
    stamps: list[int] = field(default_factory=list)
    recv: list[int] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    check: StampCheck = field(default_factory=StampCheck)
    rejected: int = 0


class Recorder:
    """See the module doc; ``spin(stop)`` handles commands until ``stop`` is set."""

    def __init__(
        self, contract: RobotContract, transport, out: str | os.PathLike, *, task=None, bags=None, log=print
    ):
        self.c, self.t, self.out, self.say = contract, transport, Path(out), log
        self.bags = None if bags is None else Path(bags)
        self.task_arg = task
        self.instruction = task if task is not None else contract.instruction
        keys = list(contract.observation)
        streams: list[str] = []
        for k in keys:
            for r in contract.observation[k]:
                s = r.split(".", 1)[0]
                if s not in streams:
                    streams.append(s)
        self.action_refs = None if contract.record.action == ("command",) else contract.record.action
        if self.action_refs:
            for r in self.action_refs:
                s = r.split(".", 1)[0]
                if s not in streams:
                    streams.append(s)
        self.topics: dict[str, _Topic] = {}
        for s in streams:
            spec = contract.streams[s]
            self.topics[s] = _Topic(spec.topic, spec.type, spec)
        if self.action_refs is None:
            cmd = contract.command
            self.topics[ACTION_STREAM] = _Topic(cmd.topic, cmd.type, None)
        self.keys = keys
        self.recording = False
        self.saved = self.discarded = 0
        self._lock = threading.Lock()
        self._commands: queue.Queue = queue.Queue()
        self.store = None
        for name, tp in self.topics.items():
            qos = tp.spec.qos if tp.spec is not None else contract.command.qos
            transport.subscribe(tp.topic, tp.msgtype, qos, lambda r, n=name: self._on_msg(n, r), self._on_bad)
        transport.subscribe(contract.topics.record, STRING, QosSpec("reliable", 10), self._on_command)
        transport.subscribe(contract.topics.instruction, STRING, QosSpec("latched", 1), self._on_instruction)

    # ------------------------------------------------------------------------------------------ inputs
    def _on_bad(self, e: Rejected) -> None:
        self.say(f"record: dropped: {e}")

    def _on_instruction(self, r: Received) -> None:
        if self.task_arg is None and r.msg.data:
            self.instruction = str(r.msg.data)

    def _on_command(self, r: Received) -> None:
        self.command(str(r.msg.data).strip())

    def command(self, cmd: str) -> None:
        """start | save | discard (from the record topic, keys or a script)."""
        self._commands.put(cmd)

    def _on_msg(self, name: str, r: Received) -> None:
        if not self.recording:
            return
        tp = self.topics[name]
        try:
            if tp.spec is not None:
                stamp = check_stamp(r.msg, tp.spec, r.recv_ns, tp.check)
                value = decode_stream(r.msg, tp.spec)
            else:
                value = _command_values(r.msg, tp.msgtype, tp.topic)
                stamp = stamp_ns(r.msg) or r.recv_ns  # as ingest: the header's, else the bag (receive) time
        except Rejected as e:
            tp.rejected += 1
            self._on_bad(e)
            return
        with self._lock:
            if not self.recording:
                return
            tp.check.last_ns = stamp
            tp.stamps.append(stamp)
            tp.recv.append(r.recv_ns)
            tp.values.append(value)
            tp.raw.append(r.raw if r.raw is not None else b"")

    # ------------------------------------------------------------------------------------------ episodes
    def _clear(self) -> None:
        for tp in self.topics.values():
            tp.stamps, tp.recv, tp.values, tp.raw, tp.check = [], [], [], [], StampCheck()

    def _handle(self, cmd: str) -> None:
        if cmd == "start":
            with self._lock:
                if self.recording:
                    self.discarded += 1
                    self.say("record: start during an episode: the running one is discarded")
                self._clear()
                self.recording = True
            self.say("record: episode started")
        elif cmd == "discard":
            with self._lock:
                if self.recording:
                    self.discarded += 1
                self.recording = False
                self._clear()
            self.say("record: episode discarded")
        elif cmd == "save":
            with self._lock:
                if not self.recording:
                    self.say("record: save without a started episode: ignored")
                    return
                self.recording = False
                snap = {
                    n: (list(tp.stamps), list(tp.recv), list(tp.values), list(tp.raw))
                    for n, tp in self.topics.items()
                }
                self._clear()
            try:
                self._save(snap)
            except VlaflowError as e:
                self.say(f"record: episode not saved: {e}")
        else:
            self.say(f"record: unknown command {cmd!r} (start | save | discard)")

    def assemble(self, snap: dict) -> dict[str, np.ndarray]:
        """The episode's arrays from buffered samples (the alignment of rosbag2 ingest)."""
        empty = [self.topics[n].topic for n, (st, *_rest) in snap.items() if not st]
        if empty:
            raise VlaflowError(f"no messages on {empty} during the episode")
        series = {n: np.asarray(st, dtype=np.int64) for n, (st, *_rest) in snap.items()}
        plans, warnings = plan_episodes(
            series, [(np.iinfo(np.int64).min, np.iinfo(np.int64).max)], self.c.control.rate_hz
        )
        if not plans:
            raise VlaflowError("; ".join(warnings) or "the topics never overlap in time")
        ticks = plans[0]["ticks"]
        idx = {n: asof_indices(series[n], ticks) for n in series}
        data: dict[str, np.ndarray] = {}
        for k in self.keys:
            refs = self.c.observation[k]
            if K.is_image(k):
                vals = snap[refs[0]][2]
                data[k] = np.stack([vals[i] for i in idx[refs[0]]])
            else:
                data[k] = self._vector(refs, snap, idx)
        if self.action_refs is None:
            vals = snap[ACTION_STREAM][2]
            data[K.ACTION] = np.stack([vals[i] for i in idx[ACTION_STREAM]]).astype(np.float32)
        else:
            data[K.ACTION] = self._vector(self.action_refs, snap, idx)
        return data

    def _vector(self, refs, snap, idx) -> np.ndarray:
        cols = []
        for r in refs:
            s, j = self.c.resolve(r)
            vals = snap[s][2]
            cols.append(np.array([vals[i][j] for i in idx[s]]))
        return np.stack(cols, axis=1).astype(np.float32)

    def _open_store(self, data: dict[str, np.ndarray]):
        from vlaflow.data.store import EpisodeStore, KeySpec

        names = {k: self.c.obs_names(k) for k in self.keys if not K.is_image(k)}
        names[K.ACTION] = list(self.c.action.names)
        keys = {k: KeySpec(str(v.dtype), v.shape[1:], names=names.get(k)) for k, v in data.items()}
        if self.out.exists():
            store = EpisodeStore.open(self.out, mode="a")
            have = {k: (s.dtype, tuple(s.shape)) for k, s in store.keys.items()}
            want = {k: (s.dtype, tuple(s.shape)) for k, s in keys.items()}
            if have != want:
                store.close()
                raise VlaflowError(f"record: store {self.out} has keys {have}, this contract records {want}")
            return store
        attrs = {
            "record": {"contract": self.c.name, "topics": {n: tp.topic for n, tp in self.topics.items()}}
        }
        return EpisodeStore.create(self.out, keys=keys, fps=self.c.control.rate_hz, attrs=attrs)

    def _save(self, snap: dict) -> None:
        data = self.assemble(snap)
        if self.store is None:
            self.store = self._open_store(data)
        index = self.store.append_episode(
            data, task=self.instruction, source=f"record:{self.c.name}", success=None
        )
        self.saved += 1
        n = len(data[K.ACTION])
        self.say(f"record: episode {index} saved ({n} steps)")
        if self.bags is not None:
            self._write_bag(snap, self.bags / f"episode_{index:06d}")

    def _write_bag(self, snap: dict, dest: Path) -> None:
        """The episode's raw messages as a rosbag2 MCAP bag directory (written aside, then renamed)."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        from vlaflow.real.msgs import typestore

        tmp = temp_sibling(dest)
        try:
            bag = tmp / "bag"
            w = Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP)
            w.open()
            conns = {
                n: w.add_connection(self.topics[n].topic, self.topics[n].msgtype, typestore=typestore())
                for n in snap
            }
            rows = sorted(
                (recv, n, raw)
                for n, (_st, recvs, _v, raws) in snap.items()
                for recv, raw in zip(recvs, raws, strict=True)
            )
            for recv, n, raw in rows:
                w.write(conns[n], int(recv), raw)
            w.close()
            os.replace(bag, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ loop
    def spin(self, stop: threading.Event, duration_s: float | None = None) -> None:
        import time

        t_end = None if duration_s is None else time.monotonic() + duration_s
        while not stop.is_set() and (t_end is None or time.monotonic() < t_end):
            try:
                cmd = self._commands.get(timeout=0.05)
            except queue.Empty:
                continue
            self._handle(cmd)
        while not self._commands.empty():  # commands that arrived before stop still count
            self._handle(self._commands.get_nowait())

    def close(self) -> None:
        if self.recording:
            self.say("record: stopped with an unsaved episode (dropped)")
            self.discarded += 1
        if self.store is not None:
            self.store.close()


def _command_values(msg: Any, msgtype: str, topic: str) -> np.ndarray:
    if msgtype == FLOAT64_ARRAY:
        v = np.asarray(msg.data, dtype=np.float64)
    elif msgtype == JOINT_TRAJECTORY:
        if not msg.points:
            raise Rejected(topic, "points", "at least one point", "none")
        v = np.asarray(msg.points[0].positions, dtype=np.float64)
    else:
        raise Rejected(topic, "type", "Float64MultiArray or JointTrajectory", msgtype)
    if not np.isfinite(v).all():
        raise Rejected(topic, "data", "finite values", str(v.tolist()))
    return v
