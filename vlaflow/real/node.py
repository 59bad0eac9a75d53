"""The policy node, independent of the transport: streams in, the executor in the middle, safety last.

Life of a run (``PolicyNode.spin`` drives :meth:`PolicyNode.tick` at the contract's control rate):

    disabled --enable True--> engage: lock the tick clock to the phase stream, build a frame, prime the
    first chunk (validated), ramp position dims from the measured state to its first action (bounded by
    the velocity / acceleration limits and ``engage_ramp_max_s``), prime again on the new state
    --> running: per tick, frame -> executor (inference on its worker thread, never in the tick)
    -> safety clamp -> command --enable False--> bring motion to rest (hold) --> disabled (summary logged)
    e-stop True (any state) --> every output gated from the next tick on; latched until the process ends

Watchdogs in the running state: a stale frame (a stream older than its ``max_age_s``) stops requesting
chunks and holds; an empty schedule (inference late) holds; a lost heartbeat holds. A hold decelerates to
rest (:meth:`SafetyLayer.hold`) and never replays a stale action. Landed chunks pass
:meth:`SafetyLayer.validate_chunk` before the executor merges them (a rejected chunk is counted by reason,
and the schedule runs dry into a hold until an acceptable chunk lands).

Diagnostics (``diagnostic_msgs/DiagnosticArray``) go out at ``diagnostics_hz``: state, latency p50/p99,
deadline misses, underruns, stale frames, rejected messages per topic, rejected chunks and safety
interventions by kind, tick jitter, end-to-end latency (observation capture stamp -> command written).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlaflow.deploy.executor import ExecutorCore, InferenceWorker, Landed, RealtimeConfig
from vlaflow.interfaces import RuntimePolicy
from vlaflow.real import msgs
from vlaflow.real.contract import (
    BOOL,
    DIAGNOSTIC_ARRAY,
    FLOAT64_ARRAY,
    STRING,
    QosSpec,
    RobotContract,
    check_policy,
)
from vlaflow.real.msgs import NS, Rejected
from vlaflow.real.safety import EStop, SafetyLayer, Verdict
from vlaflow.real.streams import Frame, FrameBuilder
from vlaflow.real.transport import Received, Transport

WINDOW = 4096  # samples kept for the jitter / end-to-end percentiles


@dataclass(frozen=True)
class NodeConfig:
    """How the node runs its policy (the robot's side is the contract)."""

    merge: str = "switch"  # executor merge: switch | rti | rtc | ensemble (see deploy/executor.py)
    exec_horizon: int = 0  # control steps between inference starts (0 = the policy's Ta)
    ensemble_decay: float = 0.01  # for merge "ensemble"
    deadline_s: float = 0.0  # an inference landing later misses its deadline (0 = s * dt)
    prime_timeout_s: float = 30.0  # the first chunk at engage must land within this
    diagnostics_hz: float = 1.0  # diagnostics messages per second (0: none)
    task: str | None = None  # instruction text (None: the instruction topic, else the contract's)
    name: str = "vlaflow_node"  # diagnostics status name


class ChunkRejected(Exception):
    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        super().__init__(f"chunk rejected ({verdict.reason}): {verdict.detail}")


class ValidatingWorker:
    """A worker whose landed chunks pass ``validate(landed, now_step)`` before the executor sees them."""

    def __init__(self, inner: InferenceWorker, validate):
        self.inner, self.validate = inner, validate
        self.nfe = inner.nfe
        self.accepted: deque[tuple[int, int]] = deque(maxlen=64)  # (start step, H) of accepted chunks

    @property
    def busy(self) -> bool:
        return self.inner.busy

    def submit(self, request) -> None:
        self.inner.submit(request)

    def poll(self, step: int) -> Landed | None:
        landed = self.inner.poll(step)
        if landed is None or not self.validate(landed, step):
            return None
        self.accepted.append((landed.step, len(landed.chunk)))
        return landed

    def wait(self, timeout: float | None = None) -> Landed:
        landed = self.inner.wait(timeout)
        verdict = self.validate(landed, landed.step)
        if not verdict:
            raise ChunkRejected(verdict)
        self.accepted.append((landed.step, len(landed.chunk)))
        return landed


def _pct(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


@dataclass
class RunLog:
    """One engaged run's counters (the per-run summary)."""

    started_ns: int = 0
    ended_ns: int = 0
    end_reason: str = ""
    seed: int | None = None
    ticks: int = 0
    policy_actions: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    chunk_rejects: dict[str, int] = field(default_factory=dict)
    ramp_ticks: int = 0
    past_step_actions: int = 0  # actions emitted for a step other than the current one (must stay 0)
    executor: dict = field(default_factory=dict)


class PolicyNode:
    """See the module doc. ``runtime`` is any :class:`~vlaflow.interfaces.RuntimePolicy`."""

    def __init__(
        self,
        contract: RobotContract,
        runtime: RuntimePolicy,
        transport: Transport,
        cfg: NodeConfig | None = None,
        log=None,
    ):
        self.contract, self.runtime, self.transport = contract, runtime, transport
        self.cfg = cfg = cfg or NodeConfig()
        self.spec = spec = runtime.config
        check_policy(contract, spec, getattr(runtime, "name", None) or type(runtime).__name__)
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.dt = contract.dt
        a, s = contract.action, contract.safety
        extra = tuple(a.state or ()) + (tuple(s.workspace.position) if s.workspace else ())
        self.frames = FrameBuilder(contract, spec.obs_keys, extra)
        self.safety = SafetyLayer(a, s, self.dt)
        self.estop = EStop()
        self.rt_cfg = RealtimeConfig(
            merge=cfg.merge,
            exec_horizon=cfg.exec_horizon,
            ensemble_decay=cfg.ensemble_decay,
            deadline_s=cfg.deadline_s,
            wait_first=True,
        )
        self.state = "disabled"  # disabled | running | stopping | estopped | fault
        self.enabled = False
        self.instruction = cfg.task if cfg.task is not None else (contract.instruction or spec.task or "")
        self._pending_seed: int | None = None
        self._last_heartbeat_ns: int | None = None
        self._lock = threading.Lock()
        self.core: ExecutorCore | None = None
        self.worker: InferenceWorker | None = None
        self.run: RunLog | None = None
        self.runs: list[dict] = []
        self.step = 0
        self.t0_ns = 0  # tick k of the current run is at t0_ns + k * dt
        self._ramp: list[np.ndarray] = []
        self._priming = False
        self.engage_refused: str | None = None  # why the last engage was refused (cleared by a new enable)
        self._frame: Frame | None = None
        self._jitter: deque[float] = deque(maxlen=WINDOW)
        self._e2e: deque[float] = deque(maxlen=WINDOW)  # observation -> first command of its chunk
        self._age: deque[float] = deque(maxlen=WINDOW)  # observation -> every command it drives
        self._last_source: int | None = None
        self._obs_stamp: dict[int, int] = {}  # request step -> newest capture stamp of its frame
        self.commands_sent = 0
        self.ticks = 0
        self.tick_overruns = 0
        self._subscribe()

    # ------------------------------------------------------------------------------------------ wiring
    def _subscribe(self) -> None:
        c, t = self.contract, self.transport
        for name, spec in c.streams.items():
            buf = self.frames.buffers[name]
            t.subscribe(
                spec.topic, spec.type, spec.qos, lambda r, b=buf: b.push(r.msg, r.recv_ns), buf.reject
            )
        latched = QosSpec("latched", 1)
        t.subscribe(c.topics.enable, BOOL, latched, self._on_enable, self._on_bad)
        t.subscribe(c.topics.estop, BOOL, latched, self._on_estop, self._on_bad)
        t.subscribe(c.topics.instruction, STRING, latched, self._on_instruction, self._on_bad)
        t.subscribe(c.topics.episode, STRING, QosSpec("reliable", 10), self._on_episode, self._on_bad)
        if c.safety.heartbeat_topic:
            t.subscribe(
                c.safety.heartbeat_topic, BOOL, QosSpec("sensor", 1), self._on_heartbeat, self._on_bad
            )
        self.command_pub = t.publisher(c.command.topic, c.command.type, c.command.qos)
        self.diag_pub = t.publisher(c.topics.diagnostics, DIAGNOSTIC_ARRAY, QosSpec("reliable", 10))
        self.bad_messages: dict[str, int] = {}

    def _on_bad(self, e: Rejected) -> None:
        self.bad_messages[e.topic] = self.bad_messages.get(e.topic, 0) + 1

    def _on_enable(self, r: Received) -> None:
        self.enabled = bool(r.msg.data)
        if self.enabled:
            self.engage_refused = None

    def _on_estop(self, r: Received) -> None:
        if bool(r.msg.data):
            self.estop.trip("e-stop topic", r.recv_ns)

    def _on_instruction(self, r: Received) -> None:
        if self.cfg.task is None and r.msg.data:
            self.instruction = str(r.msg.data)

    def _on_episode(self, r: Received) -> None:
        kind, _, arg = str(r.msg.data).partition(":")
        if kind == "reset":
            try:
                self._pending_seed = int(arg) if arg else None
            except ValueError:
                self._on_bad(Rejected(self.contract.topics.episode, "data", "reset[:SEED]", repr(r.msg.data)))

    def _on_heartbeat(self, r: Received) -> None:
        self._last_heartbeat_ns = r.recv_ns

    # ------------------------------------------------------------------------------------------ helpers
    def measured(self, frame: Frame) -> np.ndarray:
        """The measured value of every action dim (NaN where the contract names none)."""
        refs = self.contract.action.state
        if refs is None:
            return np.full(self.contract.action.dim, np.nan)
        return np.array([frame.value(r, self.contract) for r in refs])

    def ws_position(self, frame: Frame | None) -> np.ndarray | None:
        ws = self.contract.safety.workspace
        if ws is None or frame is None:
            return None
        return np.array([frame.value(r, self.contract) for r in ws.position])

    def _validate(self, landed: Landed, now_step: int) -> Verdict:
        first = max(0, now_step - landed.step)
        # the first-action check compares a primed chunk with the measured state the robot rests in
        measured = self.measured(self._frame) if self._priming and self._frame is not None else None
        verdict = self.safety.validate_chunk(landed.chunk, first, measured, continuous=not self._priming)
        if not verdict and self.run is not None:
            self.run.chunk_rejects[verdict.reason] = self.run.chunk_rejects.get(verdict.reason, 0) + 1
            self.log(
                f"[{self.cfg.name}] chunk from step {landed.step} rejected: {verdict.reason}: "
                f"{verdict.detail}"
            )
        return verdict

    def heartbeat_ok(self, t_ns: int) -> bool:
        s = self.contract.safety
        if not s.heartbeat_topic:
            return True
        hb = self._last_heartbeat_ns
        return hb is not None and (t_ns - hb) <= s.heartbeat_timeout_s * NS

    def _publish(self, out: np.ndarray, t_ns: int, preview: list[np.ndarray]) -> None:
        c = self.contract.command
        if c.type == FLOAT64_ARRAY:
            msg = msgs.float64_array(out, label=f"vlaflow:{self.step}:{t_ns}")
        else:
            pts = [out, *preview][: c.lookahead]
            pos = np.stack(pts)
            prev = self.safety.last if self.safety.last is not None else pos[0]
            vel = np.diff(np.concatenate([prev[None], pos]), axis=0) / self.dt
            msg = msgs.joint_trajectory(
                t_ns,
                c.joint_names,
                [
                    (p, v, round((i + 1) * self.dt * NS))
                    for i, (p, v) in enumerate(zip(pos, vel, strict=True))
                ],
            )
        self.command_pub.publish(msg)
        self.commands_sent += 1
        if self.run is not None and self.transport.now_ns() - t_ns > self.dt * NS:
            self.run.past_step_actions += 1  # written after its step's slot had passed

    def _preview(self, n: int, hold: bool) -> list[np.ndarray]:
        """The next ``n`` commands as they stand now (scheduled, clamped; or the hold), without committing."""
        if n <= 0:
            return []
        saved = self.safety.snapshot()
        out = []
        try:
            for i in range(1, n + 1):
                a = None if hold or self.core is None else self.core.schedule.peek(self.step + i)
                b = self.safety.hold() if a is None else self.safety.clamp(a, self.ws_position(self._frame))
                self.safety.commit(b)
                out.append(b)
        finally:
            self.safety.restore(saved)
        return out

    # ------------------------------------------------------------------------------------------ the tick
    def tick(self, t_ns: int) -> None:
        """One control tick at ROS time ``t_ns`` (see the module doc)."""
        self.ticks += 1
        if self.estop.tripped:
            if self.state not in ("estopped",):
                self._end_run("estop") if self.run is not None else None
                self.state = "estopped"
                self.log(f"[{self.cfg.name}] E-STOP latched ({self.estop.reason}); output gated")
            return
        if self.state == "disabled":
            if self.enabled:
                self._engage(t_ns)
            return
        if self.state == "fault":
            return
        self.step += 1
        run = self.run
        run.ticks += 1
        if self._ramp:
            out = self._ramp.pop(0)
            run.ramp_ticks += 1
            self.safety.commit(out)
            self._publish(out, t_ns, self._ramp[: self.contract.command.lookahead - 1])
            return
        if self.core is None and not self._prime(t_ns):  # the ramp is done: prime on the state it reached
            return
        frame = self._frame = self.frames.frame(t_ns)
        if self.state == "stopping" or not self.enabled:
            self.state = "stopping"
            self._hold("disable", t_ns)
            if np.allclose(self.safety.velocity, 0) and np.allclose(self.safety.last[self.safety.delta], 0):
                self._end_run("disabled")
            return
        fresh = frame.ok
        why = None if fresh else "stale_observation"
        if fresh and not self.heartbeat_ok(t_ns):
            fresh, why = False, "heartbeat_lost"
        core = self.core
        if fresh:
            core.observe(self.step, (t_ns - self.t0_ns) / NS, frame.obs)
            newest = max(s.capture_ns for n, s in frame.samples.items() if s is not None)
            self._obs_stamp[self.step] = newest
        try:
            a = core.tick(self.step, request=fresh)
        except Exception as e:  # the runtime raised on its worker thread: stop moving, stay down
            self.log(f"[{self.cfg.name}] inference failed: {type(e).__name__}: {e}; holding and disengaging")
            self.state = "fault"
            self._hold("fault", t_ns)
            self._end_run("fault")
            return
        if not fresh or core.last_was_hold:
            self._hold(why or "underrun", t_ns)
            return
        out = self.safety.clamp(a, self.ws_position(frame))
        self.safety.commit(out)
        self._publish(out, t_ns, self._preview(self.contract.command.lookahead - 1, hold=False))
        run.policy_actions += 1
        self._record_latency(t_ns)

    def _hold(self, why: str, t_ns: int) -> None:
        run = self.run
        out = self.safety.hold()
        self.safety.count(f"hold_{why}")
        if run is not None:
            run.holds[why] = run.holds.get(why, 0) + 1
        self.safety.commit(out)
        self._publish(out, t_ns, self._preview(self.contract.command.lookahead - 1, hold=True))

    def _record_latency(self, t_ns: int) -> None:
        """End-to-end latency: capture stamp of a chunk's observation -> its first command written (the
        chunk's fresh action); and the age of every command's observation (chunks run open loop)."""
        for start, h in reversed(self.worker_v.accepted):
            if start <= self.step < start + h:
                stamp = self._obs_stamp.get(start)
                if stamp is not None:
                    age = (self.transport.now_ns() - stamp) / NS
                    self._age.append(age)
                    if start != self._last_source:
                        self._e2e.append(age)
                self._last_source = start
                break
        for k in [k for k in self._obs_stamp if k < self.step - 4 * self.spec.horizon]:
            del self._obs_stamp[k]

    # ------------------------------------------------------------------------------------------ engage
    def _engage(self, t_ns: int) -> None:
        lock = self.contract.control.phase_lock
        if lock is not None:
            newest = self.frames.buffers[lock].newest()
            if newest is None:
                return  # nothing to lock to yet: wait
        frame = self.frames.frame(t_ns)
        if not frame.ok:
            return  # wait for fresh observations
        seed, self._pending_seed = self._pending_seed, None
        self.run = RunLog(started_ns=t_ns, seed=seed)
        self.step, self._ramp, self._obs_stamp = 0, [], {}
        if seed is not None:
            self.runtime.reset(seed=seed)
        self._frame = frame
        measured = self.measured(frame)
        start = np.where(np.isfinite(measured), measured, 0.0)
        self.safety.reset(start)
        self.worker = InferenceWorker(self.runtime.infer, self.spec, name="vlaflow-node-infer").start()
        self.worker_v = ValidatingWorker(self.worker, self._validate)
        if not self._prime(t_ns, frame, first_prime=True):
            return
        first = self.core.schedule.peek(self.step)
        self._ramp = self._plan_ramp(measured, first)
        if self._ramp is None:
            self._abort("engage refused: the first action is too far to ramp within engage_ramp_max_s")
            return
        if self._ramp:
            self.core = None  # primed again on the state the ramp ends in
        self.state = "running"
        # the primed chunk's first action goes out at the next tick: a robot at rest loses none of its
        # actions to the time priming took
        self.step = -1
        if lock is not None:  # tick k runs phase_offset after the lock stream's k-th stamp
            stamp = self.frames.buffers[lock].newest().capture_ns
            self.t0_ns = stamp + round(self.contract.control.phase_offset_s * NS)
        else:
            self.t0_ns = t_ns
        self.log(
            f"[{self.cfg.name}] engaged (seed {seed}, ramp {len(self._ramp)} ticks, merge {self.cfg.merge})"
        )

    def _prime(self, t_ns: int, frame: Frame | None = None, first_prime: bool = False) -> bool:
        frame = frame or self.frames.frame(t_ns)
        self._frame = frame
        if not frame.ok:
            self._abort(f"engage refused: stale streams {frame.stale}")
            return False
        self.core = ExecutorCore(self.worker_v, self.spec, self.rt_cfg, self.instruction or None)
        self.core.observe(self.step, 0.0, frame.obs)
        self._obs_stamp[self.step] = max(s.capture_ns for s in frame.samples.values() if s is not None)
        self._priming = True
        try:
            self.core.prime(self.step, timeout=self.cfg.prime_timeout_s)
        except ChunkRejected as e:
            self._abort(f"engage refused: {e}")
            return False
        except Exception as e:  # a runtime error or timeout on the first chunk
            self._abort(f"engage failed: {type(e).__name__}: {e}")
            return False
        finally:
            self._priming = False
        if first_prime:  # dims without a measured state (grippers, unmeasured) start at the policy's first
            first = self.core.schedule.peek(self.step)
            s = self.safety
            keep = s.delta | (s.pos & np.isfinite(self.measured(frame)))
            s.last = np.where(keep, s.last, first)
        return True

    def _plan_ramp(self, measured: np.ndarray, first: np.ndarray) -> list[np.ndarray] | None:
        """Minimum-jerk ramp of the position dims from ``measured`` to ``first`` (empty: none needed)."""
        s = self.safety
        d = np.where(s.pos & np.isfinite(measured), np.abs(first - measured), 0.0)
        if d.max() <= 1e-6:
            return []
        # minimum jerk: peak velocity 1.875 d / T, peak acceleration 5.77 d / T^2
        T = float(np.max(np.maximum(1.875 * d / s.vmax, np.sqrt(5.77 * d / s.amax)))) * 1.1
        if T > self.contract.safety.engage_ramp_max_s:
            return None
        n = max(1, math.ceil(T / self.dt))
        start = s.last.copy()
        out = []
        for i in range(1, n + 1):
            tau = i / n
            blend = 10 * tau**3 - 15 * tau**4 + 6 * tau**5
            out.append(np.where(s.pos, start + (first - start) * blend, start))
        return out

    def _abort(self, why: str) -> None:
        self.log(f"[{self.cfg.name}] {why}")
        self._end_run(why)

    def _end_run(self, why: str) -> None:
        if self.worker is not None:
            self.worker.close(timeout=1.0)
        run = self.run
        if run is not None:
            run.ended_ns, run.end_reason = self.transport.now_ns(), why
            run.executor = self.core.stats() if self.core is not None else {}
            summary = {**asdict(run), "safety_interventions": dict(self.safety.interventions)}
            summary["duration_s"] = (run.ended_ns - run.started_ns) / NS
            self.runs.append(summary)
            self.log(f"[{self.cfg.name}] run summary: {json.dumps(summary, default=float)}")
        self.run, self.core, self.worker, self._ramp = None, None, None, []
        if self.state not in ("estopped", "fault"):
            self.state = "disabled"
        if why.startswith("engage"):  # no retry every tick: the operator toggles enable to try again
            self.engage_refused, self.enabled = why, False

    # ------------------------------------------------------------------------------------------ clock
    def spin(self, stop: threading.Event, duration_s: float | None = None) -> None:
        """Tick at the control rate until ``stop`` is set (or ``duration_s`` has passed)."""
        dt_ns = round(self.dt * NS)
        t_end = None if duration_s is None else self.transport.now_ns() + round(duration_s * NS)
        diag_every = round(NS / self.cfg.diagnostics_hz) if self.cfg.diagnostics_hz > 0 else None
        next_diag = self.transport.now_ns()
        slot = self.transport.now_ns()
        try:
            while not stop.is_set() and (t_end is None or self.transport.now_ns() < t_end):
                was_running = self.state == "running"
                now = self.transport.now_ns()
                if now < slot:
                    time.sleep((slot - now) / NS)
                now = self.transport.now_ns()
                if now - slot > dt_ns:
                    self.tick_overruns += 1
                    slot = now
                if self.state == "running" and was_running:
                    self._jitter.append((now - slot) / NS)
                self.tick(slot)
                if self.state == "running" and not was_running:  # engaged: tick on the locked phase
                    slot = self.t0_ns + dt_ns * (1 + max(0, (self.transport.now_ns() - self.t0_ns) // dt_ns))
                    self.t0_ns = slot  # step 0 (the primed chunk's first action) is the first tick
                else:
                    slot += dt_ns
                if diag_every is not None and self.transport.now_ns() >= next_diag:
                    self.publish_diagnostics()
                    next_diag += diag_every
        finally:
            if self.run is not None:
                self._end_run("shutdown")

    # ------------------------------------------------------------------------------------------ reports
    def diagnostics(self) -> dict[str, Any]:
        st = self.core.stats() if self.core is not None else {}
        rejects = {t: c["rejected"] for t, c in self.frames.counters().items() if c["rejected"]}
        for t, n in self.bad_messages.items():
            rejects[t] = rejects.get(t, 0) + n
        return {
            "state": self.state,
            "estop": self.estop.tripped,
            "ticks": self.ticks,
            "commands_sent": self.commands_sent,
            "latency_p50_s": st.get("latency_p50_s"),
            "latency_p99_s": st.get("latency_p99_s"),
            "deadline_misses": st.get("deadline_misses", 0) + self.tick_overruns,
            "underruns": st.get("underruns", 0),
            "stale_dropped": st.get("stale_dropped", 0),
            "stale_frames": self.frames.stale_frames,
            "rejected_messages": rejects,
            "safety_interventions": dict(self.safety.interventions),
            "tick_overruns": self.tick_overruns,
            "tick_jitter_p50_s": _pct(self._jitter, 50),
            "tick_jitter_p99_s": _pct(self._jitter, 99),
            "e2e_latency_p50_s": _pct(self._e2e, 50),
            "e2e_latency_p99_s": _pct(self._e2e, 99),
            "command_age_p50_s": _pct(self._age, 50),
            "command_age_p99_s": _pct(self._age, 99),
        }

    def publish_diagnostics(self) -> None:
        d = self.diagnostics()
        level = 2 if self.state in ("estopped", "fault") else (1 if d["rejected_messages"] else 0)
        flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in d.items()}
        self.diag_pub.publish(
            msgs.diagnostic_array(self.transport.now_ns(), self.cfg.name, level, self.state, flat)
        )
