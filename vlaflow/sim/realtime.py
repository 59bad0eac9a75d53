"""The real-time executor on the simulator's clock: the deploy core with inference latency simulated.

The harness steps the env once per control step and calls ``act(obs, t)``; :class:`SimClockExecutor`
runs the same :class:`~vlaflow.deploy.executor.ExecutorCore` a robot runs, with a worker whose inference
is computed at submit (a chunk depends only on the observations up to its start) but handed back only
once a latency drawn from a distribution has passed on the sim clock. The latency RNG is seeded per
episode, so a rollout is deterministic per seed: "as if on the robot". Evaluate with
``vlaflow.sim.evaluate.evaluate(..., executor="realtime", realtime=SimRealtimeConfig(...))``; the executor
statistics land in each episode's ``result["executor"]`` in report.json.

Latency specs (seconds): ``fixed:L`` (or a bare number), ``uniform:A:B``, ``normal:M:S`` (clipped at 0),
``lognormal:MEDIAN:S``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vlaflow.deploy.executor import (
    ExecutorCore,
    InferRequest,
    Landed,
    NfeCount,
    RealtimeConfig,
    run_inference,
)
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec

LATENCY_KINDS = ("fixed", "uniform", "normal", "lognormal")
NEVER = 10**12  # landing step of a stalled inference


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


@dataclass(frozen=True)
class SimRealtimeConfig:
    """The executor's settings plus how its inference latency is simulated."""

    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)  # merge, horizon, deadline, wait_first
    latency: str = "fixed:0"  # simulated latency (s): fixed:L | uniform:A:B | normal:M:S | lognormal:MED:S
    stall_after: int = -1  # inferences after this many never land (-1 = never; the awaited first lands)
    seed: int = 0  # mixed with the episode seed for the latency RNG

    def __post_init__(self):
        if not isinstance(self.realtime, RealtimeConfig):
            raise ConfigError(
                f"SimRealtimeConfig.realtime must be a RealtimeConfig, got {type(self.realtime).__name__}"
            )
        parse_latency(self.latency)


class SimulatedWorker:
    """The inference worker on the sim clock: computed at submit, handed back once its latency has passed.

    A latency of L seconds lands at tick start + ceil(L / dt) (integer microseconds, so 0.1 s at 10 Hz is
    exactly one step). The awaited first chunk is handed back at once (the robot waits for it), its drawn
    latency still counted against the deadline.
    """

    def __init__(self, infer: Callable, spec: RuntimeSpec, cfg: SimRealtimeConfig, episode_seed: int = 0):
        self.infer, self.spec, self.cfg = infer, spec, cfg
        self.nfe = NfeCount()
        self._latency = parse_latency(cfg.latency)
        self._rng = np.random.default_rng([int(episode_seed) % (2**32), cfg.seed])
        self._dt_us = round(1.0 / float(spec.fps) * 1e6)
        self._submitted = 0
        self._pending: tuple[Landed, int] | None = None  # (result, landing step)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, request: InferRequest) -> None:
        chunk = run_inference(self.infer, self.spec, request, self.nfe)
        n, self._submitted = self._submitted, self._submitted + 1
        stalled = 0 <= self.cfg.stall_after <= n and not request.awaited
        lat = math.inf if stalled else draw_latency(*self._latency, self._rng)
        if stalled:
            land = NEVER
        else:
            land = request.step - (-round(lat * 1e6) // self._dt_us)  # start + ceil(latency / dt)
        self._pending = (Landed(request.step, chunk, lat), land)

    def poll(self, step: int) -> Landed | None:
        if self._pending is None or self._pending[1] > step:
            return None
        landed, self._pending = self._pending[0], None
        return landed

    def wait(self, timeout: float | None = None) -> Landed:
        if self._pending is None or math.isinf(self._pending[0].latency_s):
            raise RuntimeError("SimulatedWorker.wait: no inference in flight that will ever land")
        landed, self._pending = self._pending[0], None
        return landed


class SimClockExecutor:
    """``act(obs, t)`` per control step on the sim clock: the deploy core with a :class:`SimulatedWorker`."""

    def __init__(
        self,
        infer: Callable,
        spec: RuntimeSpec,
        cfg: SimRealtimeConfig | None = None,
        task_text: str | None = None,
        episode_seed: int = 0,
    ):
        self.cfg = cfg or SimRealtimeConfig()
        self.worker = SimulatedWorker(infer, spec, self.cfg, episode_seed)
        self.core = ExecutorCore(self.worker, spec, self.cfg.realtime, task_text)
        self._primed = False

    def act(self, obs: dict[str, np.ndarray], t: int) -> np.ndarray:
        core = self.core
        core.observe(t, t * core.dt, obs)
        if self.cfg.realtime.wait_first and not self._primed:
            core.prime(t)
        self._primed = True
        return core.tick(t)

    def stats(self) -> dict:
        return self.core.stats()


def make_realtime_policy(
    checkpoint: str, merge: str = "switch", device: str = "cpu", runtime_kwargs: dict | None = None
):
    """Load ``checkpoint`` with the runtime ``merge`` needs: RTI (``rti``), RTC (``rtc``) or plain.

    A zero-argument factory for :func:`vlaflow.sim.evaluate.evaluate` via ``functools.partial``
    (picklable), evaluated with ``executor="realtime"`` and a :class:`SimRealtimeConfig` of the same
    merge. ``runtime_kwargs`` go to RTIConfig / RTCConfig / PolicyRuntime.
    """
    rk = dict(runtime_kwargs or {})
    RealtimeConfig(merge=merge)  # a bad merge name is an error before any checkpoint is read
    # torch-heavy loaders are imported here so the harness (and this module) stay torch-free
    if merge == "rti":
        from vlaflow.deploy.rti import load_rti_policy

        return load_rti_policy(checkpoint, device=device, **rk)
    if merge == "rtc":
        from vlaflow.deploy.rtc import load_rtc_policy

        return load_rtc_policy(checkpoint, device=device, **rk)
    from vlaflow.policies.runtime import load_policy

    return load_policy(checkpoint, device=device, **rk)
