"""The real-time executor: chunked policies at a fixed control rate, inference never inside the tick.

Shapes: H chunk length, Da action dim, Ta actions per replan, s execution horizon (control steps between
inference starts, default Ta), d inference delay in control steps.

Timing (absolute control steps k; step k happens at time k * dt)::

    tick k:   observation k arrives (timestamped buffer) -> finished chunks are merged into the schedule
              -> the worker, if idle and s steps have passed since the last start, starts on obs k-To+1..k
              -> the action scheduled for step k is emitted (or a hold when none is: an underrun)
    a chunk started at tick k holds actions for steps k..k+H-1; it lands at time k*dt + latency, i.e. at
    tick k + ceil(latency / dt); its entries for steps that have already passed are dropped (stale,
    counted), never replayed.

The schedule is keyed by absolute step. Merging a landed chunk: ``switch`` (its actions replace the
scheduled ones), ``rti`` and ``rtc`` (the same replacement, with the chunk produced by an
:class:`~vlaflow.deploy.rti.RTIRuntime` warm-started from the previous chunk shifted by s, or an
:class:`~vlaflow.deploy.rtc.RTCRuntime` that freezes the first d actions and inpaints the overlap), or
``ensemble`` (ACT's temporal ensembling: every chunk's action for the step, weights exp(-m * i), i = 0 the
oldest chunk). A hold repeats the last emitted action.

Pieces (one core, any clock):
- :class:`ExecutorCore`: buffers, schedule, merging, statistics. ``observe(step, t, obs)`` then
  ``tick(step) -> action`` once per control step; ``tick`` never blocks on inference: it collects a
  landed chunk from its worker without waiting, submits a request when one is due, and emits.
- a worker (:class:`Worker`): :class:`InferenceWorker` runs ``infer`` on its own thread behind a request
  and a result queue (errors come back to the next tick); the simulator's worker
  (:mod:`vlaflow.sim.realtime`) computes at submit and releases after a simulated latency.
- :class:`ThreadedExecutor`: the wall clock, a short loop of sleep-until-slot, observe, tick, send.

Statistics (``ExecutorCore.stats()``): deadline misses (inference that landed after its deadline, default
s * dt; plus overrun ticks on the wall clock), queue underruns (holds), stale actions dropped, boundary
jump (distance between the landing chunk's action and the one it replaced), boundary / interior / mean
jerk (:mod:`vlaflow.deploy.schedule`), network evaluations, latency (mean, and p50/p99/max over the last
:data:`LATENCY_WINDOW` inferences). Memory stays bounded however long the executor runs.

Nothing here imports torch: a robot computer with numpy + onnxruntime runs it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vlaflow.deploy.schedule import ChunkSchedule, JerkMeter
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec, as_infer_result, check_chunk

MERGES = ("switch", "rti", "rtc", "ensemble")
LATENCY_WINDOW = 1024  # inferences the latency percentiles are taken over (a robot's diagnostics window)


@dataclass(frozen=True)
class RealtimeConfig:
    """How the executor runs a policy in real time (on any clock)."""

    merge: str = "switch"  # "switch" | "rti" | "rtc" | "ensemble" (see the module doc)
    exec_horizon: int = 0  # s: control steps between inference starts (0 = the policy's Ta)
    ensemble_decay: float = 0.01  # ACT's m in exp(-m * i) for "ensemble"
    deadline_s: float = 0.0  # an inference landing later than this misses its deadline (0 = s * dt)
    wait_first: bool = True  # the first chunk is awaited before the first tick (the robot waits)

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ConfigError(f"RealtimeConfig.merge must be one of {MERGES}, got {self.merge!r}")
        if self.exec_horizon < 0:
            raise ConfigError(f"RealtimeConfig.exec_horizon must be >= 0, got {self.exec_horizon}")
        if self.ensemble_decay < 0 or self.deadline_s < 0:
            raise ConfigError(
                f"RealtimeConfig.ensemble_decay/deadline_s must be >= 0, got "
                f"{self.ensemble_decay}/{self.deadline_s}"
            )


# ---------------------------------------------------------------------------------------------- worker seam
@dataclass(frozen=True)
class InferRequest:
    """One inference the core asks its worker for."""

    step: int  # control step of the newest observation in the window; chunk[0] is the action for it
    window: dict[str, Any]  # {key: (To, *shape)} oldest first (+ "task" text)
    kwargs: dict[str, int] = field(default_factory=dict)  # shift (rti, rtc) and delay (rtc) for infer
    awaited: bool = False  # the caller blocks until it lands (the first chunk, before the first tick)


@dataclass(frozen=True)
class Landed:
    """A finished inference, ready to merge."""

    step: int  # the request's step: chunk[i] is for step + i
    chunk: np.ndarray  # (H, Da) float64, checked
    latency_s: float  # from submit to result


class NfeCount:
    """Network evaluations spent, counted when an inference finishes (landed or not); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total, self.count = 0, 0
        self.first: int | None = None
        self.after_first_max: int | None = None

    def add(self, nfe: int | None) -> None:
        if nfe is None:  # the runtime does not count its evaluations
            return
        with self._lock:
            n = int(nfe)
            if self.count == 0:
                self.first = n
            else:
                self.after_first_max = n if self.after_first_max is None else max(self.after_first_max, n)
            self.total += n
            self.count += 1

    def stats(self) -> dict:
        with self._lock:
            return {
                "nfe_total": self.total if self.count else None,
                "nfe_first": self.first,
                "nfe_after_first_max": self.after_first_max,
            }


class Worker(Protocol):
    """Runs the inferences an :class:`ExecutorCore` submits, one at a time.

    ``busy`` from ``submit`` until its result is handed back by ``poll`` or ``wait``. ``poll(step)`` never
    blocks: the landed chunk, or None; an exception raised by the inference is raised here. ``wait`` blocks
    (only for an awaited request). ``nfe`` counts the network evaluations spent.
    """

    nfe: NfeCount

    @property
    def busy(self) -> bool: ...

    def submit(self, request: InferRequest) -> None: ...

    def poll(self, step: int) -> Landed | None: ...

    def wait(self, timeout: float | None = None) -> Landed: ...


def run_inference(infer: Callable, spec: RuntimeSpec, request: InferRequest, nfe: NfeCount) -> np.ndarray:
    """``infer`` on the request's window, checked: the (H, Da) float64 chunk; counts its NFE."""
    result = as_infer_result(infer(request.window, **request.kwargs))
    chunk = check_chunk(result.actions, spec)
    nfe.add(result.nfe)
    return chunk


class InferenceWorker:
    """One inference thread between the control tick and the runtime: a request queue in, a result queue out.

    The tick thread calls ``submit`` / ``poll`` (never blocking); ``infer`` runs only on this worker's
    thread. An exception inside ``infer`` (or a bad chunk) is handed back and raised by the next ``poll``,
    i.e. by the next tick, with a note naming the step. ``close()`` stops the thread after the inference
    in flight (a runtime stuck forever leaves a daemon thread behind; ``close`` then returns False).
    """

    def __init__(
        self,
        infer: Callable,
        spec: RuntimeSpec,
        clock: Callable[[], float] = time.monotonic,
        name: str = "vlaflow-infer",
    ):
        self.infer, self.spec, self.clock, self.name = infer, spec, clock, name
        self.nfe = NfeCount()
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._busy = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> InferenceWorker:
        if not self.running:
            self._requests, self._results, self._busy = queue.Queue(), queue.Queue(), False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread; True when it has ended within ``timeout`` seconds."""
        if self._thread is None:
            return True
        self._requests.put(None)
        self._thread.join(timeout=timeout)
        ended = not self._thread.is_alive()
        self._thread = None
        return ended

    def __enter__(self) -> InferenceWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, request: InferRequest) -> None:
        if not self.running:
            raise RuntimeError("InferenceWorker.submit before start() (or after close())")
        if self._busy:
            raise RuntimeError("InferenceWorker runs one inference at a time; the previous one is in flight")
        self._busy = True
        self._requests.put((request, self.clock()))

    def poll(self, step: int) -> Landed | None:
        try:
            item = self._results.get_nowait()
        except queue.Empty:
            return None
        return self._hand_back(item)

    def wait(self, timeout: float | None = None) -> Landed:
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no chunk from the inference worker within {timeout} s") from None
        return self._hand_back(item)

    def _hand_back(self, item) -> Landed:
        self._busy = False
        if isinstance(item, BaseException):
            raise item
        return item

    def _run(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            request, t_submit = item
            try:
                chunk = run_inference(self.infer, self.spec, request, self.nfe)
            except Exception as e:  # handed to the tick, which raises it
                e.add_note(f"raised by the inference worker for the chunk started at step {request.step}")
                self._results.put(e)
                continue
            self._results.put(Landed(request.step, chunk, self.clock() - t_submit))


# ---------------------------------------------------------------------------------------------- core
class ExecutorCore:
    """Buffers, schedule, merging and statistics, driven one control step at a time on any clock.

    Per step: ``observe(step, t, obs)`` then ``tick(step) -> action (Da,)``. With ``cfg.wait_first`` call
    ``prime(step)`` once after the first ``observe``: it blocks until the first chunk lands (the robot
    waits before moving). Use it from one thread (the tick's); the worker is the only other thread.
    """

    def __init__(
        self,
        worker: Worker,
        spec: RuntimeSpec,
        cfg: RealtimeConfig | None = None,
        task_text: str | None = None,
    ):
        self.worker, self.spec, self.task_text = worker, spec, task_text
        self.cfg = cfg = cfg or RealtimeConfig()
        self.keys = spec.obs_keys
        self.dt = 1.0 / float(spec.fps)
        self.s = cfg.exec_horizon or spec.n_action_steps
        if self.s > spec.horizon:
            raise ConfigError(f"exec_horizon {self.s} exceeds the policy's horizon {spec.horizon}")
        self.deadline_s = cfg.deadline_s or self.s * self.dt
        # what the merge asks of the runtime: RTI warm-starts from the shifted chunk, RTC also freezes d steps
        self._kw = {"rti": ("shift",), "rtc": ("shift", "delay")}.get(cfg.merge, ())
        self.schedule = ChunkSchedule(cfg.merge == "ensemble", cfg.ensemble_decay)
        self.obs_buffer: deque = deque(maxlen=spec.n_obs_steps)  # (step, time, obs)
        self.last_start: int | None = None  # step of the latest submitted request
        self.last_was_hold = False
        self.counts = {"inferences": 0, "deadline_misses": 0, "underruns": 0, "stale_dropped": 0, "ticks": 0}
        self._last_action: np.ndarray | None = None
        self._jerk = JerkMeter()
        self._boundaries = 0
        self._jump_total = 0.0
        self._jumps = 0
        self._latency_total = 0.0
        self._recent_latency: deque = deque(maxlen=LATENCY_WINDOW)

    # ------------------------------------------------------------------------------------------ per step
    def observe(self, step: int, t: float, obs: dict) -> None:
        """The observation of control step ``step`` taken at time ``t`` (s); extra keys are ignored."""
        obs = {k: np.asarray(obs[k]) for k in self.keys}
        if not self.obs_buffer:
            self.obs_buffer.extend([(step, t, obs)] * self.spec.n_obs_steps)  # edge-pad like training windows
        else:
            self.obs_buffer.append((step, t, obs))

    def prime(self, step: int, timeout: float | None = None) -> None:
        """Submit on the current window and block until that chunk lands (before the first tick)."""
        self._submit(step, awaited=True)
        self._land(self.worker.wait(timeout), step)

    def tick(self, step: int, request: bool = True) -> np.ndarray:
        """The action for control step ``step``: collect, submit when due, emit. Never waits on inference.

        ``request=False`` collects and emits but starts no inference (a robot node whose observation is
        stale stops requesting chunks on it).
        """
        self._collect(step)
        if request and not self.worker.busy and self.due(step):
            self._submit(step)
            self._collect(step)  # a (simulated) zero-latency inference lands in the tick that started it
        return self._emit(step)

    # ------------------------------------------------------------------------------------------ pieces
    def window(self) -> dict:
        obs = {k: np.stack([o[k] for _, _, o in self.obs_buffer]) for k in self.keys}  # (To, ...) per key
        if self.task_text is not None:
            obs["task"] = self.task_text
        return obs

    def due(self, step: int) -> bool:
        """Start a new inference at ``step``? (s steps after the previous start, or nothing scheduled.)"""
        if self.last_start is None:
            return True
        last = self.schedule.last_step()
        return step - self.last_start >= self.s or last is None or last <= step

    def infer_kwargs(self, step: int) -> dict:
        kw = {}
        if "shift" in self._kw:
            kw["shift"] = step - self.last_start if self.last_start is not None else 0
        if "delay" in self._kw:  # d estimated online from the latencies measured so far
            recent = list(self._recent_latency)[-10:]
            lat = max(recent) if recent else 0.0
            kw["delay"] = min(int(math.ceil(lat / self.dt - 1e-9)), self.spec.horizon)
        return kw

    def _submit(self, step: int, awaited: bool = False) -> None:
        request = InferRequest(step, self.window(), self.infer_kwargs(step), awaited=awaited)
        self.last_start = step
        self.worker.submit(request)

    def _collect(self, step: int) -> None:
        landed = self.worker.poll(step)
        if landed is not None:
            self._land(landed, step)

    def _land(self, landed: Landed, now_step: int) -> None:
        before = self.schedule.peek(now_step)
        self.counts["stale_dropped"] += self.schedule.merge(landed.chunk, landed.step, now_step)
        after = self.schedule.peek(now_step)
        if self.counts["inferences"] > 0 and after is not None:
            self._jerk.mark_boundary()  # the next emitted action is the first this chunk drives
            self._boundaries += 1
            if before is not None:
                self._jump_total += float(np.linalg.norm(after - before))
                self._jumps += 1
        self.counts["inferences"] += 1
        self._latency_total += landed.latency_s
        self._recent_latency.append(landed.latency_s)
        if landed.latency_s > self.deadline_s + 1e-9:
            self.counts["deadline_misses"] += 1

    def _emit(self, step: int) -> np.ndarray:
        self.counts["ticks"] += 1
        a = self.schedule.take(step)
        self.last_was_hold = a is None
        if a is None:
            self.counts["underruns"] += 1
            if self._last_action is None:
                raise RuntimeError("no action available before the first chunk landed (wait_first=False)")
            a = self._last_action  # hold: repeat the last command
        self._last_action = np.asarray(a, dtype=np.float64)
        self._jerk.add(self._last_action)
        return self._last_action

    def stats(self) -> dict:
        """Counters and smoothness so far (JSON-ready); see the module doc."""
        n = self.counts["inferences"]
        recent = np.asarray(self._recent_latency, dtype=np.float64)
        return {
            **self.counts,
            "boundaries": self._boundaries,
            "boundary_jerk": self._jerk.boundary,
            "interior_jerk": self._jerk.interior,
            "boundary_jump": self._jump_total / self._jumps if self._jumps else 0.0,
            "mean_jerk": self._jerk.mean,
            "mean_latency_s": self._latency_total / n if n else 0.0,
            "latency_p50_s": float(np.percentile(recent, 50)) if len(recent) else None,
            "latency_p99_s": float(np.percentile(recent, 99)) if len(recent) else None,
            "latency_max_s": float(recent.max()) if len(recent) else None,
            **self.worker.nfe.stats(),
        }


# ---------------------------------------------------------------------------------------------- wall clock
class ThreadedExecutor:
    """Wall-clock executor: a fixed-rate tick and one :class:`InferenceWorker` thread.

    ``get_obs()`` returns the current observation dict; ``send_action(a)`` commands the robot. A tick that
    starts more than one period after its slot counts as an overrun (and a deadline miss).
    """

    def __init__(
        self,
        infer: Callable,
        spec: RuntimeSpec,
        get_obs: Callable[[], dict],
        send_action: Callable[[np.ndarray], None],
        cfg: RealtimeConfig | None = None,
        task_text: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg = cfg or RealtimeConfig()
        self.worker = InferenceWorker(infer, spec, clock=clock)
        self.core = ExecutorCore(self.worker, spec, self.cfg, task_text)
        self.get_obs, self.send_action, self.clock, self.sleep = get_obs, send_action, clock, sleep
        self.tick_overruns = 0

    def run(self, n_ticks: int) -> dict:
        """Run ``n_ticks`` control ticks at the policy's fps; returns :meth:`stats`."""
        core, dt = self.core, self.core.dt
        with self.worker:
            t0 = self.clock()
            if self.cfg.wait_first:  # the robot waits for its first chunk before the first tick
                core.observe(0, 0.0, self.get_obs())
                core.prime(0)
                t0 = self.clock()
            for k in range(n_ticks):
                slot, now = t0 + k * dt, self.clock()
                if now < slot:
                    self.sleep(slot - now)
                elif now - slot > dt:
                    self.tick_overruns += 1
                if k > 0 or not self.cfg.wait_first:
                    core.observe(k, self.clock() - t0, self.get_obs())
                self.send_action(core.tick(k))
        return self.stats()

    def stats(self) -> dict:
        st = self.core.stats()
        st["deadline_misses"] += self.tick_overruns
        st["tick_overruns"] = self.tick_overruns
        return st


# ---------------------------------------------------------------------------------------------- reports
SUMMED = (
    "ticks",
    "inferences",
    "deadline_misses",
    "underruns",
    "stale_dropped",
    "boundaries",
    "tick_overruns",
)
AVERAGED = ("boundary_jerk", "interior_jerk", "boundary_jump", "mean_jerk", "mean_latency_s")


def aggregate_stats(per_episode: Sequence[dict]) -> dict:
    """Executor statistics of several episodes (or runs) as one: counts summed, smoothness and latency
    averaged over episodes, NFE summed and per control step; keys absent from every entry are left out."""
    per = [p for p in per_episode if p]
    out: dict[str, Any] = {"n_episodes": len(per)}
    for key in SUMMED:
        vals = [p[key] for p in per if p.get(key) is not None]
        if vals:
            out[key] = int(sum(vals))
    for key in AVERAGED:
        vals = [p[key] for p in per if p.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    lat_max = [p["latency_max_s"] for p in per if p.get("latency_max_s") is not None]
    if lat_max:
        out["latency_max_s"] = float(max(lat_max))
    nfe = [p["nfe_total"] for p in per if p.get("nfe_total") is not None]
    if any("nfe_total" in p for p in per):
        out["nfe_total"] = int(sum(nfe)) if nfe else None
        ticks = out.get("ticks", 0)
        out["nfe_per_control_step"] = out["nfe_total"] / ticks if nfe and ticks else None
        out["nfe_first"] = next((p["nfe_first"] for p in per if p.get("nfe_first") is not None), None)
        later = [p["nfe_after_first_max"] for p in per if p.get("nfe_after_first_max") is not None]
        out["nfe_after_first_max"] = max(later) if later else None
    return out
