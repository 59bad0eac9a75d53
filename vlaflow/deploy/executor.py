"""The real-time executor: chunked policies at a fixed control rate with inference running beside the tick.

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

Two clocks, one core (:class:`ChunkSchedule` + :class:`_ExecutorCore`):
- :class:`SimClockExecutor`: the sim clock (the harness's ``act(obs, t)``), inference latency simulated
  from a distribution (``fixed:0.1``, ``uniform:0.05:0.15``, ``normal:0.1:0.02``, ``lognormal:MEDIAN:S``)
  drawn from an RNG seeded per episode, so a rollout is deterministic per seed: "as if on the robot".
  Registered in the eval harness as executor ``realtime``; settings travel on the policy object
  (:class:`RealtimeSimPolicy`, built by :func:`make_realtime_policy`).
- :class:`ThreadedExecutor`: wall clock, an inference worker thread (never inside the tick), for robots.

Reports (``stats()``): deadline misses (inference that landed after its deadline, default s * dt; plus
overrun ticks on the wall clock), queue underruns (holds), stale actions dropped, boundary jump (distance
between the landing chunk's action and the one it replaced) and boundary jerk (the largest third
difference of the emitted actions whose stencil spans a chunk boundary, action units / step^3), beside
the same statistic mid-chunk (interior jerk: the policy's own jerk, a floor for the boundary value).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec, as_infer_result, check_chunk

MERGES = ("switch", "rti", "rtc", "ensemble")
LATENCY_KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class RealtimeConfig:
    """How the executor runs a policy in real time."""

    merge: str = "switch"  # "switch" | "rti" | "rtc" | "ensemble" (see the module doc)
    latency: str = "fixed:0"  # simulated latency (s): fixed:L | uniform:A:B | normal:M:S | lognormal:MED:S
    exec_horizon: int = 0  # s: control steps between inference starts (0 = the policy's Ta)
    ensemble_decay: float = 0.01  # ACT's m in exp(-m * i) for "ensemble"
    deadline_s: float = 0.0  # an inference landing later than this misses its deadline (0 = s * dt)
    stall_after: int = (
        -1
    )  # test/sim: inferences after this many never land (-1 = never; the awaited first lands)
    wait_first: bool = True  # the episode's first chunk is awaited before the first tick (robot waits)
    seed: int = 0  # mixed with the episode seed for the latency RNG
    stats_dir: str = ""  # sim: write per-episode stats JSON here (seed<N>.json), for multi-process evals

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ConfigError(f"RealtimeConfig.merge must be one of {MERGES}, got {self.merge!r}")
        parse_latency(self.latency)
        if self.exec_horizon < 0:
            raise ConfigError(f"RealtimeConfig.exec_horizon must be >= 0, got {self.exec_horizon}")
        if self.ensemble_decay < 0 or self.deadline_s < 0:
            raise ConfigError(
                f"RealtimeConfig.ensemble_decay/deadline_s must be >= 0, got "
                f"{self.ensemble_decay}/{self.deadline_s}"
            )


def parse_latency(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"fixed:0.1"`` -> ("fixed", (0.1,)); a bare number means fixed; bad specs name the valid forms."""
    s = str(spec).strip()
    kind, _, rest = s.partition(":")
    if not rest:
        kind, rest = "fixed", s
    nargs = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}
    try:
        vals = tuple(float(v) for v in rest.split(":"))
    except ValueError:
        vals = ()
    if kind not in nargs or len(vals) != nargs[kind] or any(v < 0 or not math.isfinite(v) for v in vals):
        raise ConfigError(
            f"latency {spec!r} not understood; expected fixed:L | uniform:A:B | normal:M:S | lognormal:MED:S "
            "(seconds, >= 0)"
        )
    return kind, vals


def draw_latency(kind: str, vals: tuple[float, ...], rng: np.random.Generator) -> float:
    if kind == "fixed":
        return vals[0]
    if kind == "uniform":
        return float(rng.uniform(min(vals), max(vals)))
    if kind == "normal":
        return float(max(0.0, rng.normal(vals[0], vals[1])))
    return float(vals[0] * math.exp(rng.normal(0.0, vals[1])))


# ---------------------------------------------------------------------------------------------- schedule
class ChunkSchedule:
    """Actions keyed by absolute control step; chunks merge in by replacement or temporal ensembling."""

    def __init__(self, ensemble: bool, decay: float = 0.01):
        self.ensemble = ensemble
        self.decay = decay
        self._entries: dict[int, list[tuple[int, np.ndarray]]] = {}  # step -> [(chunk id, action)]
        self._next_id = 0

    def peek(self, step: int) -> np.ndarray | None:
        items = self._entries.get(step)
        if not items:
            return None
        if not self.ensemble or len(items) == 1:
            return items[-1][1]
        ids = np.array([cid for cid, _ in items], dtype=np.float64)
        w = np.exp(-self.decay * (ids - ids.min()))  # the oldest chunk weighs most (ACT)
        return np.tensordot(w / w.sum(), np.stack([a for _, a in items]), axes=1)

    def merge(self, chunk: np.ndarray, start_step: int, now_step: int) -> int:
        """Merge ``chunk`` (H, Da) whose entry i is for step start_step + i; returns stale entries dropped."""
        cid = self._next_id
        self._next_id += 1
        stale = 0
        for i, a in enumerate(chunk):
            step = start_step + i
            if step < now_step:  # its time has passed: never executed
                stale += 1
                continue
            if self.ensemble:
                self._entries.setdefault(step, []).append((cid, np.asarray(a, dtype=np.float64)))
            else:
                self._entries[step] = [(cid, np.asarray(a, dtype=np.float64))]
        return stale

    def take(self, step: int) -> np.ndarray | None:
        """The action for ``step``, forgetting every entry at or before it (nothing is replayed)."""
        action = self.peek(step)
        for k in [k for k in self._entries if k <= step]:
            del self._entries[k]
        return action

    def last_step(self) -> int | None:
        return max(self._entries) if self._entries else None


def boundary_jerk(actions: np.ndarray, boundaries: list[int]) -> float:
    """Mean over boundaries b of the largest ||third difference|| whose stencil spans steps b-1 -> b."""
    a = np.asarray(actions, dtype=np.float64)
    vals = []
    for b in boundaries:
        js = [j for j in (b, b + 1, b + 2) if j - 3 >= 0 and j < len(a)]
        if js:
            vals.append(max(float(np.linalg.norm(a[j] - 3 * a[j - 1] + 3 * a[j - 2] - a[j - 3])) for j in js))
    return float(np.mean(vals)) if vals else 0.0


def interior_jerk(actions: np.ndarray, boundaries: list[int]) -> float:
    """The same statistic as :func:`boundary_jerk` at the midpoint between consecutive boundaries.

    A reference for how jerky the policy's own chunks are: a perfectly continued chunk cannot bring the
    boundary statistic below it (both take the largest of three stencils), so ``boundary - interior``
    is the part of the boundary jerk that the chunk switch itself adds.
    """
    mids = [(a + b) // 2 for a, b in zip(boundaries, boundaries[1:], strict=False) if b - a >= 4]
    return boundary_jerk(actions, mids)


def mean_jerk(actions: np.ndarray) -> float:
    a = np.asarray(actions, dtype=np.float64)
    if len(a) < 4:
        return 0.0
    d3 = a[3:] - 3 * a[2:-1] + 3 * a[1:-2] - a[:-3]
    return float(np.linalg.norm(d3, axis=-1).mean())


# ---------------------------------------------------------------------------------------------- core
class _ExecutorCore:
    """Buffers, schedule, merging and statistics shared by the sim-clock and wall-clock executors."""

    def __init__(self, infer: Callable, spec: RuntimeSpec, cfg: RealtimeConfig, task_text: str | None):
        self.infer, self.spec, self.cfg, self.task_text = infer, spec, cfg, task_text
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
        self.emitted: list[np.ndarray] = []
        self.boundaries: list[int] = []
        self.jumps: list[float] = []
        self.latencies: list[float] = []
        self.last_start: int | None = None
        self.nfe: list[int] = []  # network evaluations per inference, where the runtime reports them
        self.counts = {"inferences": 0, "deadline_misses": 0, "underruns": 0, "stale_dropped": 0, "ticks": 0}
        self.last_was_hold = False

    def observe(self, step: int, t: float, obs: dict) -> None:
        obs = {k: np.asarray(obs[k]) for k in self.keys}
        if not self.obs_buffer:
            self.obs_buffer.extend([(step, t, obs)] * self.spec.n_obs_steps)  # edge-pad like training windows
        else:
            self.obs_buffer.append((step, t, obs))

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
            lat = max(self.latencies[-10:]) if self.latencies else 0.0
            kw["delay"] = min(int(math.ceil(lat / self.dt - 1e-9)), self.spec.horizon)
        return kw

    def run_infer(self, obs_window: dict, kw: dict) -> np.ndarray:
        result = as_infer_result(self.infer(obs_window, **kw))
        chunk = check_chunk(result.actions, self.spec)
        if result.nfe is not None:  # runtimes that count their network evaluations
            self.nfe.append(int(result.nfe))
        return chunk

    def land(self, chunk: np.ndarray, start_step: int, now_step: int, latency: float) -> None:
        before = self.schedule.peek(now_step)
        self.counts["stale_dropped"] += self.schedule.merge(chunk, start_step, now_step)
        after = self.schedule.peek(now_step)
        if self.counts["inferences"] > 0 and after is not None:
            self.boundaries.append(len(self.emitted))  # index (in emitted) of the first step it drives
            if before is not None:
                self.jumps.append(float(np.linalg.norm(after - before)))
        self.counts["inferences"] += 1
        self.latencies.append(latency)
        if latency > self.deadline_s + 1e-9:
            self.counts["deadline_misses"] += 1

    def emit(self, step: int) -> np.ndarray:
        self.counts["ticks"] += 1
        a = self.schedule.take(step)
        self.last_was_hold = a is None
        if a is None:
            self.counts["underruns"] += 1
            if not self.emitted:
                raise RuntimeError("no action available before the first chunk landed (wait_first=False)")
            a = self.emitted[-1]  # hold: repeat the last command
        self.emitted.append(np.asarray(a, dtype=np.float64))
        return self.emitted[-1]

    def stats(self) -> dict:
        acts = np.asarray(self.emitted)
        return {
            **self.counts,
            "boundaries": len(self.boundaries),
            "boundary_jerk": boundary_jerk(acts, self.boundaries),
            "interior_jerk": interior_jerk(acts, self.boundaries),
            "boundary_jump": float(np.mean(self.jumps)) if self.jumps else 0.0,
            "mean_jerk": mean_jerk(acts),
            "mean_latency_s": float(np.mean(self.latencies)) if self.latencies else 0.0,
            "nfe_total": int(sum(self.nfe)) if self.nfe else None,
            "nfe_first": self.nfe[0] if self.nfe else None,
            "nfe_after_first_max": max(self.nfe[1:]) if len(self.nfe) > 1 else None,
        }


# ---------------------------------------------------------------------------------------------- sim clock
class SimClockExecutor:
    """The executor on the simulator's clock: ``act(obs, t)`` per control step, latency simulated.

    The chunk is computed when its inference starts (it depends only on the observations up to then) but
    becomes visible only when the simulated latency has elapsed on the sim clock.
    """

    def __init__(
        self,
        infer: Callable,
        spec: RuntimeSpec,
        cfg: RealtimeConfig | None = None,
        task_text: str | None = None,
        episode_seed: int = 0,
    ):
        self.cfg = cfg or RealtimeConfig()
        self.core = _ExecutorCore(infer, spec, self.cfg, task_text)
        self._lat = parse_latency(self.cfg.latency)
        self._rng = np.random.default_rng([int(episode_seed) % (2**32), self.cfg.seed])
        self._pending: tuple[int, int, float, np.ndarray] | None = None  # (start, land step, latency, chunk)
        self._seed = int(episode_seed)

    @classmethod
    def for_harness(cls, infer: Callable, spec: RuntimeSpec, task_text: str | None = None):
        """Settings from the policy object behind ``infer`` (``.realtime``, ``.episode_seed``)."""
        owner = getattr(infer, "__self__", None)
        cfg = getattr(owner, "realtime", None) or RealtimeConfig()
        return cls(infer, spec, cfg, task_text=task_text, episode_seed=getattr(owner, "episode_seed", 0))

    def _start(self, step: int) -> None:
        core = self.core
        kw = core.infer_kwargs(step)
        chunk = core.run_infer(core.window(), kw)
        n = core.counts["inferences"]
        first = self.cfg.wait_first and core.last_start is None
        stalled = 0 <= self.cfg.stall_after <= n and not first  # the awaited first chunk always lands
        lat = math.inf if stalled else draw_latency(*self._lat, self._rng)
        if first:
            lat_steps = 0  # the robot waits for its first chunk before the first tick
        elif math.isinf(lat):
            lat_steps = 10**12
        else:
            # integer microseconds so 0.1 s at 10 Hz is exactly one step, not 1.0000000000000002
            lat_us, dt_us = round(lat * 1e6), round(core.dt * 1e6)
            lat_steps = -(-lat_us // dt_us)
        core.last_start = step
        self._pending = (step, step + lat_steps, lat, chunk)

    def act(self, obs: dict[str, np.ndarray], t: int) -> np.ndarray:
        core = self.core
        core.observe(t, t * core.dt, obs)
        if self._pending is None and core.due(t):
            self._start(t)
        if self._pending is not None and self._pending[1] <= t:
            start, _, lat, chunk = self._pending
            self._pending = None
            core.land(chunk, start, t, lat)
            if core.due(t):  # the worker is free again and already due (latency >= s): restart at once
                self._start(t)
                if self._pending[1] <= t:
                    start, _, lat, chunk = self._pending
                    self._pending = None
                    core.land(chunk, start, t, lat)
        action = core.emit(t)
        if self.cfg.stats_dir:
            self._write_stats()
        return action

    def stats(self) -> dict:
        return {"seed": self._seed, **self.core.stats()}

    def _write_stats(self) -> None:
        d = Path(self.cfg.stats_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".seed{self._seed}.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.stats()))
        os.replace(tmp, d / f"seed{self._seed}.json")


class RealtimeSimPolicy:
    """A runtime plus its :class:`RealtimeConfig`, so the harness's ``realtime`` executor can read it.

    Passes ``infer`` keywords (shift, delay) through to runtimes that take them; remembers the episode
    seed given by the harness (the executor's latency RNG uses it).
    """

    def __init__(self, runtime, realtime: RealtimeConfig):
        self.runtime, self.realtime = runtime, realtime
        self.episode_seed = 0

    @property
    def config(self) -> RuntimeSpec:
        return self.runtime.config

    def reset(self, seed: int | None = None) -> None:
        self.episode_seed = int(seed or 0)
        self.runtime.reset(seed=seed)

    def infer(self, obs: dict, *, shift: int | None = None, delay: int | None = None):
        return self.runtime.infer(obs, shift=shift, delay=delay)


def make_realtime_policy(
    checkpoint: str,
    merge: str = "switch",
    latency: str = "fixed:0",
    device: str = "cpu",
    runtime_kwargs: dict | None = None,
    **realtime_fields: Any,
) -> RealtimeSimPolicy:
    """Load ``checkpoint`` with the runtime ``merge`` needs (RTI / RTC / plain) and attach the settings.

    A zero-argument factory for ``vlaflow.sim.evaluate`` via ``functools.partial`` (picklable); evaluate
    with ``executor="realtime"``. ``runtime_kwargs`` go to RTIConfig / RTCConfig / PolicyRuntime.
    """
    rk = dict(runtime_kwargs or {})
    cfg = RealtimeConfig(merge=merge, latency=latency, **realtime_fields)
    if merge == "rti":
        from vlaflow.deploy.rti import load_rti_policy

        runtime = load_rti_policy(checkpoint, device=device, **rk)
    elif merge == "rtc":
        from vlaflow.deploy.rtc import load_rtc_policy

        runtime = load_rtc_policy(checkpoint, device=device, **rk)
    else:
        from vlaflow.policies.runtime import load_policy

        runtime = load_policy(checkpoint, device=device, **rk)
    return RealtimeSimPolicy(runtime, cfg)


# ---------------------------------------------------------------------------------------------- wall clock
class ThreadedExecutor:
    """Wall-clock executor: a fixed-rate tick and one inference worker thread.

    ``get_obs()`` returns the current observation dict; ``send_action(a)`` commands the robot. The tick
    never calls ``infer``: it hands the obs window to the worker through a queue and picks up landed
    chunks without blocking. A tick that starts later than its slot counts as a deadline miss.
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
        self.core = _ExecutorCore(infer, spec, self.cfg, task_text)
        self.get_obs, self.send_action, self.clock, self.sleep = get_obs, send_action, clock, sleep
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._busy = False
        self.tick_overruns = 0
        self.infer_thread_ids: set[int] = set()
        self.tick_thread_id = threading.get_ident()

    def _worker(self) -> None:
        while True:
            req = self._requests.get()
            if req is None:
                return
            start, t_start, window, kw = req
            self.infer_thread_ids.add(threading.get_ident())
            try:
                chunk = self.core.run_infer(window, kw)
            except Exception as e:  # surfaced by the tick loop, which stops the run
                self._results.put((start, self.clock() - t_start, e))
                continue
            self._results.put((start, self.clock() - t_start, chunk))

    def run(self, n_ticks: int) -> dict:
        """Run ``n_ticks`` control ticks at the policy's fps; returns :meth:`stats`."""
        core = self.core
        self.tick_thread_id = threading.get_ident()
        worker = threading.Thread(target=self._worker, name="vlaflow-infer", daemon=True)
        worker.start()
        try:
            t0 = self.clock()
            if self.cfg.wait_first:  # wait for the first chunk before the first tick
                core.observe(0, 0.0, self.get_obs())
                self._submit(0, t0)
                start, lat, chunk = self._results.get()
                self._busy = False
                if isinstance(chunk, Exception):
                    raise chunk
                core.land(chunk, 0, 0, lat)
                t0 = self.clock()
            for k in range(n_ticks):
                slot = t0 + k * core.dt
                now = self.clock()
                if now < slot:
                    self.sleep(slot - now)
                elif now - slot > core.dt:
                    self.tick_overruns += 1
                if k > 0 or not self.cfg.wait_first:
                    core.observe(k, self.clock() - t0, self.get_obs())
                while True:  # landed chunks (never blocks)
                    try:
                        start, lat, chunk = self._results.get_nowait()
                    except queue.Empty:
                        break
                    self._busy = False
                    if isinstance(chunk, Exception):
                        raise chunk
                    core.land(chunk, start, k, lat)
                if not self._busy and core.due(k):
                    self._submit(k, self.clock())
                self.send_action(core.emit(k))
        finally:
            self._requests.put(None)
            worker.join(timeout=5.0)
        return self.stats()

    def _submit(self, step: int, t_start: float) -> None:
        kw = self.core.infer_kwargs(step)
        self.core.last_start = step
        self._busy = True
        self._requests.put((step, t_start, self.core.window(), kw))

    def stats(self) -> dict:
        st = self.core.stats()
        st["deadline_misses"] += self.tick_overruns
        st["tick_overruns"] = self.tick_overruns
        return st

