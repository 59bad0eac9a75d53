"""The real-time executor: never an action whose time has passed (property test over random latencies),
holds when inference stalls, zero latency equals synchronous chunking, the inference worker never runs in
the control tick and the tick never waits for it, worker errors surface at the next tick, the streaming
jerk statistics equal the whole-history ones, the harness runs it on the sim clock with its statistics in
report.json, and the robot-side modules import no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaflow.deploy.executor import (
    ExecutorCore,
    InferenceWorker,
    RealtimeConfig,
    ThreadedExecutor,
    aggregate_stats,
)
from vlaflow.deploy.schedule import ChunkSchedule, JerkMeter, boundary_jerk, interior_jerk, mean_jerk
from vlaflow.deploy.sync_chunk import SyncChunkExecutor
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.sim.realtime import SimClockExecutor, SimRealtimeConfig, parse_latency

H, TA, FPS = 8, 4, 10.0
SPEC = RuntimeSpec(
    n_obs_steps=2, horizon=H, n_action_steps=TA, obs_shapes={"obs.state": (1,)}, action_dim=1, fps=FPS
)


def _sim_cfg(merge="switch", latency="fixed:0", exec_horizon=0, stall_after=-1):
    return SimRealtimeConfig(
        RealtimeConfig(merge=merge, exec_horizon=exec_horizon), latency=latency, stall_after=stall_after
    )


class StepEcho:
    """chunk[i] = the step it is for (the obs carries its step), so an emitted action names its own time."""

    def __init__(self, sleep_s: float = 0.0):
        self.config, self.sleep_s = SPEC, sleep_s
        self.calls: list[dict] = []
        self.threads: set[int] = set()

    def reset(self, seed=None):
        self.calls.clear()

    def infer(self, obs, shift=None, delay=None):
        self.threads.add(threading.get_ident())
        self.calls.append({"shift": shift, "delay": delay})
        if self.sleep_s:
            time.sleep(self.sleep_s)
        step = float(obs["obs.state"][-1, 0])
        return (step + np.arange(H, dtype=np.float64))[:, None]


def _obs(t):
    return {"obs.state": np.array([float(t)])}


def _run_sim(cfg, n_steps, latencies_seed=0):
    pol = StepEcho()
    ex = SimClockExecutor(pol.infer, SPEC, cfg, episode_seed=latencies_seed)
    out, holds = [], []
    for t in range(n_steps):
        out.append(float(ex.act(_obs(t), t)[0]))
        holds.append(ex.core.last_was_hold)
    return out, holds, ex, pol


@settings(max_examples=60, deadline=None)
@given(
    lat_lo=st.floats(0.0, 0.5),
    lat_span=st.floats(0.0, 0.8),
    merge=st.sampled_from(["switch", "ensemble", "rti", "rtc"]),
    s=st.integers(1, H),
    stall_after=st.integers(-1, 6),
    seed=st.integers(0, 1000),
)
def test_never_emits_an_action_whose_time_has_passed(lat_lo, lat_span, merge, s, stall_after, seed):
    cfg = _sim_cfg(
        merge=merge, latency=f"uniform:{lat_lo}:{lat_lo + lat_span}", exec_horizon=s, stall_after=stall_after
    )
    out, holds, ex, _ = _run_sim(cfg, 60, seed)
    prev = None
    for t, (a, hold) in enumerate(zip(out, holds, strict=True)):
        if hold:
            assert a == prev  # a hold repeats the last command, it never reaches back into a chunk
        else:
            assert a == pytest.approx(t)  # the scheduled action is the one for this very step
        prev = a
    st_ = ex.stats()
    assert st_["underruns"] == sum(holds) and st_["ticks"] == 60
    if stall_after >= 0:  # inference stalls: once the last landed chunk runs out, the executor holds
        assert st_["inferences"] <= max(stall_after, 1)


def test_stall_drops_to_hold_after_the_last_chunk():
    cfg = _sim_cfg(latency="fixed:0.1", stall_after=2)
    out, holds, ex, _ = _run_sim(cfg, 40)
    first_hold = holds.index(True)
    # chunk 2 started at step 4 (covers 4..11) and was the last to land: steps 12.. are holds of action 11
    assert first_hold == 12 and all(holds[12:]) and out[12:] == [11.0] * 28
    assert ex.stats()["underruns"] == 28 and ex.stats()["inferences"] == 2


def test_zero_latency_equals_synchronous_chunking():
    pol = StepEcho()
    sync = SyncChunkExecutor(pol.infer, SPEC)
    want = [float(sync.act(_obs(t), t)[0]) for t in range(30)]
    got, holds, ex, _ = _run_sim(_sim_cfg(latency="fixed:0"), 30)
    assert got == want and not any(holds) and ex.stats()["stale_dropped"] == 0


def test_latency_drops_stale_actions_and_passes_shift_and_delay():
    out, holds, ex, pol = _run_sim(_sim_cfg(merge="rtc", latency="fixed:0.1"), 30)
    assert not any(holds)
    st_ = ex.stats()
    assert st_["stale_dropped"] == st_["inferences"] - 1  # one stale action per delayed chunk (d = 1)
    assert pol.calls[0] == {"shift": 0, "delay": 0}
    assert all(c == {"shift": TA, "delay": 1} for c in pol.calls[1:])  # d estimated from measured latency
    assert st_["deadline_misses"] == 0


def test_latency_is_deterministic_per_seed():
    cfg = _sim_cfg(latency="lognormal:0.15:0.5")
    a = _run_sim(cfg, 50, 3)[2].stats()
    b = _run_sim(cfg, 50, 3)[2].stats()
    c = _run_sim(cfg, 50, 4)[2].stats()
    assert a == b and a["mean_latency_s"] != c["mean_latency_s"]


def test_ensemble_weights_oldest_chunk_most():
    sch = ChunkSchedule(ensemble=True, decay=1.0)
    sch.merge(np.array([[0.0], [0.0]]), 0, 0)
    sch.merge(np.array([[1.0], [1.0]]), 1, 1)
    w = np.exp([0.0, -1.0])
    assert float(sch.take(1)[0]) == pytest.approx(w[1] / w.sum())
    assert sch.take(0) is None  # step 0 is gone: nothing is replayed


def test_boundary_jerk_sees_a_jump_and_not_a_smooth_line():
    line = np.arange(20, dtype=float)[:, None]
    jumped = line.copy()
    jumped[10:] += 5.0
    assert boundary_jerk(line, [10]) == pytest.approx(0.0)
    assert boundary_jerk(jumped, [10]) == pytest.approx(10.0)  # stencil (1, -3, 3, -1): max 2 x the jump


def test_interior_jerk_reads_mid_chunk_not_the_boundary():
    t = np.arange(40, dtype=float)
    wiggle = np.where(t % 2 == 0, 1.0, -1.0)[:, None]  # jerky everywhere: |third difference| = 8
    jumped = wiggle.copy()
    jumped[16:] += 5.0
    assert interior_jerk(wiggle, [8, 16, 24, 32]) == pytest.approx(8.0)
    assert interior_jerk(jumped, [8, 16, 24, 32]) == pytest.approx(8.0)  # midpoints 12, 20, 28: no jump
    assert boundary_jerk(jumped, [16]) > 8.0
    assert interior_jerk(wiggle, [8]) == 0.0  # needs two boundaries


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="latency"):
        parse_latency("gamma:1")
    with pytest.raises(ConfigError, match="merge"):
        RealtimeConfig(merge="blend")


def test_threaded_executor_infers_off_the_tick_thread():
    pol = StepEcho(sleep_s=0.03)
    step = {"k": 0}
    sent = []

    def send(a):
        sent.append(float(a[0]))
        step["k"] += 1

    spec = RuntimeSpec(
        n_obs_steps=2, horizon=H, n_action_steps=TA, obs_shapes={"obs.state": (1,)}, action_dim=1, fps=50.0
    )
    pol.config = spec
    ex = ThreadedExecutor(pol.infer, spec, lambda: _obs(step["k"]), send, RealtimeConfig(merge="switch"))
    stats = ex.run(40)
    assert len(sent) == 40 and stats["inferences"] >= 2
    assert threading.get_ident() not in pol.threads  # inference never ran in the control tick's thread
    for k, a in enumerate(sent):  # scheduled actions are for their own step; otherwise a hold
        assert a == k or (k > 0 and a == sent[k - 1])


def test_harness_runs_the_realtime_executor(tmp_path):
    pytest.importorskip("gym_pusht")
    from vlaflow.sim.evaluate import evaluate
    from vlaflow.sim.policies import RandomPolicy
    from vlaflow.sim.tasks import make_env

    env = make_env("pusht", obs_mode="lowdim")
    spec = env.task_spec
    env.close()
    cfg = _sim_cfg(merge="switch", latency="fixed:0.25")
    pol = RandomPolicy(spec, horizon=8, n_action_steps=4)
    rep = evaluate(
        pol,
        task="pusht",
        n_episodes=2,
        max_steps=25,
        workers=0,
        executor="realtime",
        realtime=cfg,
        out_dir=tmp_path,
        progress=False,
    )
    assert rep["executor"] == "realtime" and rep["aggregate"]["n_episodes"] == 2
    on_disk = json.loads((tmp_path / "report.json").read_text())
    per = [e["executor"] for e in on_disk["episodes"]]
    assert len(per) == 2
    st_ = per[0]
    assert st_["ticks"] == 25 and st_["stale_dropped"] > 0 and st_["boundaries"] >= 3
    agg = on_disk["aggregate"]["executor"]
    assert agg["n_episodes"] == 2 and agg["ticks"] == 50
    assert agg["stale_dropped"] == sum(p["stale_dropped"] for p in per)
    assert agg["boundary_jerk"] == pytest.approx(np.mean([p["boundary_jerk"] for p in per]))
    assert st_["latency_p50_s"] == pytest.approx(0.25) and on_disk["realtime"]["latency"] == "fixed:0.25"


def test_realtime_settings_need_the_realtime_executor():
    from vlaflow.sim.evaluate import evaluate

    with pytest.raises(ConfigError, match="executor='realtime'"):
        evaluate("random", seeds=[0], max_steps=2, realtime=_sim_cfg(), progress=False)
    with pytest.raises(ConfigError, match="SimRealtimeConfig"):
        evaluate("random", seeds=[0], executor="realtime", realtime=RealtimeConfig(), progress=False)


# ---------------------------------------------------------------------------------------------- the core
class Stalling:
    """The first inference returns at once; later ones block until ``release`` is set (a stuck runtime)."""

    def __init__(self, fail_on: int | None = None):
        self.release = threading.Event()
        self.threads: set[int] = set()
        self.n = 0
        self.fail_on = fail_on

    def infer(self, obs, shift=None, delay=None):
        self.threads.add(threading.get_ident())
        self.n += 1
        if self.n == self.fail_on:
            raise RuntimeError("boom in the runtime")
        if self.n > 1 and self.fail_on is None:
            self.release.wait()
        step = float(obs["obs.state"][-1, 0])
        return (step + np.arange(H, dtype=np.float64))[:, None]


def test_tick_never_calls_infer_and_never_waits_for_a_stalled_runtime():
    pol = Stalling()
    worker = InferenceWorker(pol.infer, SPEC).start()
    core = ExecutorCore(worker, SPEC, RealtimeConfig())
    core.observe(0, 0.0, _obs(0))
    core.prime(0)  # the first chunk (steps 0..7) is awaited, as a robot waits before moving
    out, holds, tick_thread = [], [], {}

    def ticks():  # the control loop: 30 ticks while the second inference hangs
        tick_thread["id"] = threading.get_ident()
        for k in range(30):
            core.observe(k, k * core.dt, _obs(k))
            out.append(float(core.tick(k)[0]))
            holds.append(core.last_was_hold)

    loop = threading.Thread(target=ticks)
    loop.start()
    loop.join(timeout=60)  # generous: a tick that waited on the stuck inference would never finish
    stuck, in_flight = loop.is_alive(), worker.busy
    pol.release.set()
    assert not stuck and len(out) == 30
    assert tick_thread["id"] not in pol.threads and pol.threads  # infer ran only on the worker thread
    assert out[:H] == list(range(H)) and not any(holds[:H])  # the primed chunk, step by step
    assert all(holds[H:]) and out[H:] == [H - 1.0] * (30 - H)  # then holds of its last action
    st_ = core.stats()
    assert st_["underruns"] == 30 - H and st_["inferences"] == 1 and st_["ticks"] == 30
    assert in_flight and worker.wait(timeout=60).step == TA  # the second request (step 4) was still out
    assert pol.n == 2
    assert worker.close() and not worker.running


def test_an_exception_in_the_worker_is_raised_by_the_next_tick():
    pol = Stalling(fail_on=2)
    worker = InferenceWorker(pol.infer, SPEC).start()
    core = ExecutorCore(worker, SPEC, RealtimeConfig())
    core.observe(0, 0.0, _obs(0))
    core.prime(0)
    emitted = []
    with pytest.raises(RuntimeError, match="boom in the runtime") as e:
        for k in range(100_000):  # the error comes back within a few ticks (the worker needs the GIL)
            core.observe(k, k * core.dt, _obs(k))
            emitted.append(float(core.tick(k)[0]))
            time.sleep(0.001)
    assert any("started at step 4" in n for n in e.value.__notes__)  # the request submitted at tick Ta
    assert len(emitted) >= TA and emitted[:TA] == list(range(TA))
    assert not worker.busy  # the tick owns the decision: it may submit again or stop
    assert worker.close()


def test_threaded_executor_stops_its_worker_and_surfaces_errors():
    pol = Stalling(fail_on=1)
    ex = ThreadedExecutor(pol.infer, SPEC, lambda: _obs(0), lambda a: None, RealtimeConfig())
    with pytest.raises(RuntimeError, match="boom in the runtime"):
        ex.run(5)  # the awaited first chunk fails: the run stops before the first tick
    assert not ex.worker.running


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 60),
    marks=st.lists(st.integers(0, 60), max_size=12),
    seed=st.integers(0, 10_000),
    stats_at=st.integers(0, 60),
)
def test_streaming_jerk_equals_the_whole_history_statistics(n, marks, seed, stats_at):
    acts = np.random.default_rng(seed).normal(size=(n, 2)).cumsum(axis=0)
    marks = sorted(marks)
    meter, boundaries = JerkMeter(), []
    for i in range(n + 1):
        if i == min(stats_at, n):  # mid-stream statistics read only what has been emitted so far
            seen = acts[:i]
            assert meter.boundary == pytest.approx(boundary_jerk(seen, boundaries), rel=1e-12, abs=1e-12)
            assert meter.interior == pytest.approx(interior_jerk(seen, boundaries), rel=1e-12, abs=1e-12)
            assert meter.mean == pytest.approx(mean_jerk(seen), rel=1e-12, abs=1e-12)
        for _ in range(marks.count(i)):  # a boundary marked before action i is emitted (duplicates too)
            meter.mark_boundary()
            boundaries.append(i)
        if i < n:
            meter.add(acts[i])
    assert meter.boundary == pytest.approx(boundary_jerk(acts, boundaries), rel=1e-12, abs=1e-12)
    assert meter.interior == pytest.approx(interior_jerk(acts, boundaries), rel=1e-12, abs=1e-12)
    assert meter.mean == pytest.approx(mean_jerk(acts), rel=1e-12, abs=1e-12)


def test_aggregate_sums_counts_and_averages_smoothness():
    a = {"ticks": 10, "underruns": 1, "boundary_jerk": 2.0, "nfe_total": 30, "nfe_first": 10}
    b = {"ticks": 30, "underruns": 0, "boundary_jerk": 4.0, "nfe_total": 10, "nfe_after_first_max": 3}
    agg = aggregate_stats([a, b])
    assert agg["ticks"] == 40 and agg["underruns"] == 1 and agg["boundary_jerk"] == 3.0
    assert agg["nfe_total"] == 40 and agg["nfe_per_control_step"] == 1.0
    assert agg["nfe_first"] == 10 and agg["nfe_after_first_max"] == 3 and "stale_dropped" not in agg


# ---------------------------------------------------------------------------------------------- homes
def test_sim_only_pieces_live_in_sim_and_the_robot_pieces_in_deploy():
    import vlaflow.deploy.executor as ex
    from vlaflow.deploy.sync_chunk import SyncChunkExecutor as Sync
    from vlaflow.sim import harness
    from vlaflow.sim.realtime import (
        LATENCY_KINDS,
        SimulatedWorker,
        draw_latency,
        make_realtime_policy,
    )

    assert harness.EXECUTORS["sync"](StepEcho().infer, SPEC, None, 0, None).__class__ is Sync
    assert LATENCY_KINDS == ("fixed", "uniform", "normal", "lognormal") and SimulatedWorker
    assert draw_latency("fixed", (0.2,), np.random.default_rng(0)) == 0.2
    for gone in ("parse_latency", "draw_latency", "SimClockExecutor", "RealtimeSimPolicy", "_ExecutorCore"):
        assert not hasattr(ex, gone)
    assert not {"latency", "stall_after", "seed", "stats_dir"} & set(RealtimeConfig.__dataclass_fields__)
    with pytest.raises(ConfigError, match="merge"):
        make_realtime_policy("no/such/ckpt", merge="blend")  # named before any checkpoint is read
    with pytest.raises(ConfigError, match="latency"):
        SimRealtimeConfig(latency="soon")


def test_robot_side_executor_and_onnx_runtime_import_no_torch():
    code = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import vlaflow.deploy.executor, vlaflow.deploy.onnx_runtime
import vlaflow.deploy.schedule, vlaflow.deploy.sync_chunk
from vlaflow.deploy.executor import ExecutorCore, InferenceWorker
from vlaflow.interfaces import RuntimeSpec
spec = RuntimeSpec(1, 4, 2, {"obs.state": (1,)}, 1, 50.0)
with InferenceWorker(lambda obs: np.zeros((4, 1)), spec) as w:
    core = ExecutorCore(w, spec)
    core.observe(0, 0.0, {"obs.state": np.zeros(1)})
    core.prime(0)
    a = core.tick(0)
HEAVY = ("torch", "transformers", "onnx", "diffusers", "safetensors")
heavy = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in HEAVY)
print("ACTION", a.shape, "HEAVY", heavy)
"""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ACTION (1,) HEAVY []" in res.stdout
