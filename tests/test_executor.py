"""The real-time executor: never an action whose time has passed (property test over random latencies),
holds when inference stalls, zero latency equals synchronous chunking, the inference worker never runs in
the control tick, and the harness runs it on the sim clock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaflow.deploy.executor import RealtimeConfig, ThreadedExecutor
from vlaflow.deploy.schedule import ChunkSchedule, boundary_jerk, interior_jerk
from vlaflow.deploy.sync_chunk import SyncChunkExecutor
from vlaflow.errors import ConfigError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.sim.realtime import SimClockExecutor, SimRealtimeConfig, parse_latency


def _sim_cfg(merge="switch", latency="fixed:0", exec_horizon=0, stall_after=-1):
    return SimRealtimeConfig(
        RealtimeConfig(merge=merge, exec_horizon=exec_horizon), latency=latency, stall_after=stall_after
    )


H, TA, FPS = 8, 4, 10.0
SPEC = RuntimeSpec(
    n_obs_steps=2, horizon=H, n_action_steps=TA, obs_shapes={"obs.state": (1,)}, action_dim=1, fps=FPS
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
    import json

    on_disk = json.loads((tmp_path / "report.json").read_text())
    per = [e["executor"] for e in on_disk["episodes"]]
    assert len(per) == 2
    st_ = per[0]
    assert st_["ticks"] == 25 and st_["stale_dropped"] > 0 and st_["boundaries"] >= 3
