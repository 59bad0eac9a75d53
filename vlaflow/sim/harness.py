"""Rollout evaluation: episodes in worker processes, chunked execution through ``infer``, report.json, videos.

Reproducibility: an episode is a pure function of (task, policy, seed, instruction, executor settings). The
env is reset with the seed and the policy is re-seeded from it before every episode
(:func:`vlaflow.sim.policies.reset_policy`), so per-episode results are identical whatever the number of
workers or the order in which they pick episodes up. Jobs may name different tasks (multi-task evaluation,
:mod:`vlaflow.sim.multitask`): each process keeps one env per task, built when first needed.

Instruction: a language-conditioned policy (one whose RuntimeSpec has a default ``task``) is told, in order
of precedence, the job's instruction, the evaluation's override (``EvalSetup.instruction``), the instruction
the env's ``reset`` returned in ``info["instruction"]`` (tasks whose instruction varies by episode), or the
task's own ``task_spec.instruction``; the episode's report entry records what it was told.

Execution: an *executor* turns observations into one action per control step (``act(obs, t)``) using only
``infer(obs)`` and the policy's RuntimeSpec (To, H, Ta), and reports its statistics (``stats()``), which
become the episode's ``result["executor"]``. :data:`EXECUTORS` maps a name to a builder: ``sync``
(:class:`~vlaflow.deploy.sync_chunk.SyncChunkExecutor`: infer, execute chunk[0:Ta], replan) and
``realtime`` (:class:`~vlaflow.sim.realtime.SimClockExecutor`: the deploy executor core with simulated
latency, its settings in ``EvalSetup.realtime``).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Protocol

import numpy as np

from vlaflow.deploy.executor import aggregate_stats
from vlaflow.deploy.sync_chunk import SyncChunkExecutor
from vlaflow.errors import VlaflowError
from vlaflow.interfaces import RuntimeSpec
from vlaflow.sim.realtime import SimClockExecutor, SimRealtimeConfig

WORKER_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- executors
class StepExecutor(Protocol):
    """What the harness drives: one action per control step, statistics at the end of the episode."""

    def act(self, obs: dict[str, np.ndarray], t: int) -> np.ndarray: ...

    def stats(self) -> dict: ...


def _sync_executor(
    infer: Callable, spec: RuntimeSpec, task_text: str | None, seed: int, setup: EvalSetup
) -> StepExecutor:
    return SyncChunkExecutor(infer, spec, task_text=task_text)


def _sim_clock_executor(
    infer: Callable, spec: RuntimeSpec, task_text: str | None, seed: int, setup: EvalSetup
) -> StepExecutor:
    return SimClockExecutor(infer, spec, setup.realtime, task_text=task_text, episode_seed=seed)


# name -> builder(infer, spec, task_text, episode seed, EvalSetup)
EXECUTORS: dict[str, Callable[..., StepExecutor]] = {"sync": _sync_executor, "realtime": _sim_clock_executor}


# ---------------------------------------------------------------------------------------------- episodes
@dataclass(frozen=True)
class EpisodeJob:
    """One rollout to run."""

    index: int  # position in the report
    seed: int  # env reset seed and policy noise seed
    max_steps: int  # step limit
    video: bool = False  # record an mp4 of this episode
    replay_episode: int | None = None  # replay: the store episode whose start state and actions are used
    task: str | None = None  # task registry name of this episode (None: the setup's task)
    instruction: str | None = None  # instruction for a language-conditioned policy (None: see module doc)


@dataclass(frozen=True)
class EvalSetup:
    """Everything a worker needs to build its env and policy (picklable: sent to spawned processes)."""

    task: str  # task registry name
    env_kwargs: dict  # make_env keywords (obs_mode, render_size, ...)
    policy: object  # "random" | "replay:STORE" | checkpoint path | zero-argument factory
    device: str = "cpu"  # torch device for checkpoint policies
    executor: str = "sync"  # key of EXECUTORS
    video_dir: str | None = None  # where episode videos go
    stop_on_success: bool = True  # end an episode at the task's termination (replays always run to the end)
    realtime: SimRealtimeConfig | None = None  # the "realtime" executor's settings (None = defaults)
    instruction: str | None = None  # instruction override for every episode (None: each task's own)
    # keep each episode's steps (every observation key of the task spec, the executed action) in its
    # result under TRACE_KEY, for an episode store (``vlaflow eval --record``); replays are never recorded
    record: bool = False


TRACE_KEY = "trace"  # result entry of a recorded episode: store key -> (T, *shape), popped before the report


def _video_path(setup: EvalSetup, job: EpisodeJob) -> Path:
    tag = f"ep{job.replay_episode:04d}" if job.replay_episode is not None else f"seed{job.seed}"
    # "mw:reach" -> "mw_reach"; an imagined task "wm:RUN/checkpoints/last" -> "wm_last" (no path in a name)
    task = job.task or setup.task
    task = task.split(":", 1)[0] + "_" + Path(task.split(":", 1)[1]).name if ":" in task else task
    return Path(setup.video_dir) / f"{task}_{job.index:03d}_{tag}.mp4"


def run_episode(env, policy, job: EpisodeJob, setup: EvalSetup) -> dict:
    """Roll out one episode; returns its report entry (seed, max_reward, final_reward, success, length)."""
    from vlaflow.sim.policies import ReplayPolicy, reset_policy
    from vlaflow.sim.video import Mp4Writer

    spec: RuntimeSpec = policy.config
    reset_policy(policy, job.seed)
    options, recorded, max_steps = None, None, job.max_steps
    if job.replay_episode is not None:
        if not isinstance(policy, ReplayPolicy):
            raise VlaflowError("a replay episode needs a ReplayPolicy")
        recorded = policy.load_episode(job.replay_episode)
        options = {"reset_to_state": recorded["obs.state"][0]}
        max_steps = min(max_steps, len(recorded["action"]))
    obs, info = env.reset(seed=job.seed, options=options)
    reset_info = info
    # Language-conditioned policies (a default instruction in their spec) also get an instruction.
    task_text = None
    if spec.task:
        task_text = (
            job.instruction
            or setup.instruction
            or info.get("instruction")
            or getattr(getattr(env, "task_spec", None), "instruction", "")
            or spec.task
        )
    executor = EXECUTORS[setup.executor](policy.infer, spec, task_text, job.seed, setup)
    fps = getattr(getattr(env, "task_spec", None), "fps", None) or spec.fps  # the env's real control rate
    writer = Mp4Writer(_video_path(setup, job), fps=fps) if job.video and setup.video_dir else None
    drift_fn = getattr(env, "replay_drift", None) if recorded is not None else None
    rewards: list[float] = []
    success, max_drift = False, 0.0
    trace = _Trace(env) if setup.record and recorded is None else None
    try:
        if writer is not None:
            _write_frame(writer, env)
        for t in range(max_steps):
            action = executor.act(obs, t)
            if trace is not None:
                trace.add(obs, action)
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(float(reward))
            success = success or bool(info.get("success", False))
            if drift_fn is not None and t + 1 < max_steps:
                d = drift_fn(recorded, t + 1)  # state after action t vs the recorded state t+1
                max_drift = max(max_drift, d) if d is not None else max_drift
            if writer is not None:
                _write_frame(writer, env)
            if truncated or (terminated and setup.stop_on_success and recorded is None):
                break
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result = {
        "seed": int(job.seed),
        "max_reward": float(max(rewards)) if rewards else 0.0,
        "final_reward": float(rewards[-1]) if rewards else 0.0,
        "success": bool(success),
        "length": len(rewards),
        "executor": executor.stats(),
    }
    if job.task is not None:
        result["task"] = job.task
    if task_text is not None:
        result["instruction"] = task_text
    if "goal_split" in reset_info:
        result["goal_split"] = reset_info["goal_split"]
    metrics = getattr(env, "episode_metrics", None)
    if metrics is not None:
        result["metrics"] = {k: float(v) for k, v in metrics().items()}
    if recorded is not None:
        result["episode"] = int(job.replay_episode)
        result["max_drift_px"] = float(max_drift) if drift_fn is not None else None
    if writer is not None:
        path = writer.close()
        if path is not None:
            result["video"] = str(path.relative_to(Path(setup.video_dir).parent))
    if trace is not None:
        result[TRACE_KEY] = trace.arrays()
    return result


class _Trace:
    """One episode's steps as an episode store holds them: the observation the policy saw at step t (every
    key of the task spec's ``obs_shapes``, in its dtype) and the action executed there, clipped to the
    task's action bounds as the env applies it (``obs[t] -> action[t]``, like ``vlaflow collect``)."""

    def __init__(self, env):
        spec = env.task_spec
        self.shapes, self.dtypes = dict(spec.obs_shapes), dict(spec.obs_dtypes)
        self.low = np.asarray(spec.action_low, np.float32)
        self.high = np.asarray(spec.action_high, np.float32)
        self.steps: dict[str, list[np.ndarray]] = {k: [] for k in (*self.shapes, "action")}

    def add(self, obs: dict, action) -> None:
        missing = [k for k in self.shapes if k not in obs]
        if missing:
            raise VlaflowError(f"recording: the env's observation lacks {missing} of its own task spec")
        for k in self.shapes:
            self.steps[k].append(np.asarray(obs[k], self.dtypes[k]))
        self.steps["action"].append(np.clip(np.asarray(action, np.float32), self.low, self.high))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.steps.items() if v}


def _write_frame(writer, env) -> None:
    frame = env.render()
    if frame is not None:
        writer.write(np.asarray(frame, dtype=np.uint8))


class TaskEnvs:
    """One process's envs, one per task, each built on first use (multi-task jobs share a worker)."""

    def __init__(self, setup: EvalSetup, first=None):
        self.setup = setup
        self.envs: dict[str, object] = {} if first is None else {setup.task: first}

    def get(self, task: str | None):
        from vlaflow.sim.tasks import make_env

        task = task or self.setup.task
        if task not in self.envs:
            self.envs[task] = make_env(task, **self.setup.env_kwargs)
        return self.envs[task]

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def first_task(setup: EvalSetup) -> str:
    """The task whose env is built first: the setup's task, or a task set's first member."""
    from vlaflow.sim.tasks import expand_tasks

    return expand_tasks(setup.task)[0]


def build_env_and_policy(setup: EvalSetup, policy=None):
    """The env of ``setup``'s (first) task and the policy (built from ``setup.policy`` unless given)."""
    from vlaflow.sim.policies import build_policy
    from vlaflow.sim.tasks import make_env

    env = make_env(first_task(setup), **setup.env_kwargs)
    if policy is None:
        policy = build_policy(setup.policy, env.task_spec, device=setup.device)
    return env, policy


def _error_entry(job: EpisodeJob, message: str) -> dict:
    entry = {"seed": int(job.seed), "error": message}
    if job.task is not None:
        entry["task"] = job.task
    if job.replay_episode is not None:
        entry["episode"] = int(job.replay_episode)
    return entry


def _short_tb(exc: BaseException) -> str:
    return (
        "".join(traceback.format_exception_only(type(exc), exc)).strip()
        + "\n"
        + traceback.format_exc(limit=-3)
    )


# ---------------------------------------------------------------------------------------------- workers
def _worker_main(conn, setup: EvalSetup) -> None:
    """Worker process: build env + policy once, then run the jobs the parent sends until it sends None."""
    try:
        env, policy = build_env_and_policy(setup)
        envs = TaskEnvs(dataclasses.replace(setup, task=first_task(setup)), env)
        if sys.modules.get("torch") is not None:  # None: a torch-free process that blocked the import
            sys.modules["torch"].set_num_threads(1)
    except BaseException as e:
        conn.send(("fatal", _short_tb(e)))
        return
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            break
        try:
            conn.send(("ok", run_episode(envs.get(job.task), policy, job, setup)))
        except Exception as e:
            conn.send(("error", _error_entry(job, _short_tb(e))))
    envs.close()


@contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for child processes started inside the block; restore afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Pool:
    """Worker processes with one pipe each, so the parent always knows which job a dead worker held."""

    def __init__(self, setup: EvalSetup, n: int, start_method: str):
        self.setup = setup
        self.ctx = mp.get_context(start_method)
        self.workers: dict[int, tuple] = {}  # id -> (process, parent conn)
        self.busy: dict[int, EpisodeJob] = {}
        self._next_id = 0
        for _ in range(n):
            self.spawn()

    def spawn(self) -> int:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.setup), daemon=True)
        with _environ(WORKER_THREAD_ENV):
            proc.start()
        child.close()
        wid = self._next_id
        self._next_id += 1
        self.workers[wid] = (proc, parent)
        return wid

    def remove(self, wid: int) -> None:
        proc, conn = self.workers.pop(wid)
        conn.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()

    def close(self) -> None:
        for wid in list(self.workers):
            proc, conn = self.workers[wid]
            if proc.is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):  # the worker is already gone; it is reaped below
                    pass
            self.remove(wid)


def run_jobs(
    setup: EvalSetup,
    jobs: Sequence[EpisodeJob],
    workers: int,
    policy=None,
    progress: bool = True,
    start_method: str = "spawn",
    on_episode: Callable[[EpisodeJob, dict], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run ``jobs``; returns (episode results, errors), both in job order.

    ``on_episode(job, result)`` is called in this process as each episode finishes, in completion order
    (``evaluate`` writes recorded episodes there, so a kill keeps every finished one).

    ``workers == 0`` or an in-memory ``policy`` runs in this process. Otherwise ``workers`` spawned processes
    build their own env and policy from ``setup``; an exception in an episode, or a worker dying mid-episode,
    becomes an error entry with that episode's seed, and the other episodes go on (a dead worker is replaced).
    """
    from tqdm.auto import tqdm

    results: dict[int, dict] = {}
    errors: dict[int, dict] = {}
    bar = tqdm(total=len(jobs), desc=f"eval {setup.task}", unit="ep", disable=not progress, leave=False)

    def record(job: EpisodeJob, kind: str, payload: dict) -> None:
        if kind == "ok" and on_episode is not None:
            on_episode(job, payload)
        (results if kind == "ok" else errors)[job.index] = payload
        bar.update(1)
        done = list(results.values())
        if done:
            bar.set_postfix(score=f"{np.mean([r['max_reward'] for r in done]):.3f}", errors=len(errors))

    try:
        if workers == 0 or policy is not None:
            env, policy = build_env_and_policy(setup, policy)
            envs = TaskEnvs(dataclasses.replace(setup, task=first_task(setup)), env)
            # One torch thread, as in the workers, so in-process results match worker results (to rounding).
            torch = sys.modules.get("torch")
            threads = torch.get_num_threads() if torch is not None else None
            if torch is not None:
                torch.set_num_threads(1)
            try:
                for job in jobs:
                    try:
                        record(job, "ok", run_episode(envs.get(job.task), policy, job, setup))
                    except Exception as e:
                        record(job, "error", _error_entry(job, _short_tb(e)))
            finally:
                envs.close()
                if threads is not None:
                    torch.set_num_threads(threads)
        else:
            _run_pool(setup, jobs, min(workers, len(jobs)), start_method, record)
    finally:
        bar.close()
    order = [j.index for j in jobs]
    return [results[i] for i in order if i in results], [errors[i] for i in order if i in errors]


class _Pending:
    """Jobs handed out one at a time from any iterable (evaluate's JobList makes each on demand)."""

    def __init__(self, jobs: Iterable[EpisodeJob]):
        self._it = iter(jobs)
        self._next = next(self._it, None)

    def __bool__(self) -> bool:
        return self._next is not None

    def popleft(self) -> EpisodeJob:
        job, self._next = self._next, next(self._it, None)
        return job


def _run_pool(setup, jobs, n_workers, start_method, record) -> None:
    pending = _Pending(jobs)
    pool = _Pool(setup, n_workers, start_method)
    ready: set[int] = set()
    try:
        while pool.workers:
            for wid in [w for w in pool.workers if w in ready and w not in pool.busy]:
                _, conn = pool.workers[wid]
                if pending:
                    pool.busy[wid] = pending.popleft()
                    conn.send(pool.busy[wid])
                else:
                    conn.send(None)
                    pool.remove(wid)
            if not pool.workers:
                break
            by_handle = {}
            for wid, (proc, conn) in pool.workers.items():
                by_handle[conn] = wid
                by_handle[proc.sentinel] = wid
            for handle in wait(list(by_handle), timeout=1.0):
                wid = by_handle[handle]
                if wid not in pool.workers:
                    continue
                proc, conn = pool.workers[wid]
                try:
                    msg = conn.recv() if handle is conn or conn.poll() else None
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # the process died without a message
                    proc.join(timeout=5)
                    job = pool.busy.pop(wid, None)
                    pool.remove(wid)
                    if job is not None:
                        record(
                            job,
                            "error",
                            _error_entry(job, f"worker process died (exit code {proc.exitcode})"),
                        )
                    elif wid not in ready:
                        raise VlaflowError(
                            f"evaluation worker died while starting (exit code {proc.exitcode})"
                        )
                    if pending:
                        pool.spawn()
                    continue
                kind, payload = msg
                if kind == "fatal":
                    raise VlaflowError(f"evaluation worker could not build its env/policy:\n{payload}")
                if kind == "ready":
                    ready.add(wid)
                else:
                    record(pool.busy.pop(wid), kind, payload)
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------------- report
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the bounds are exactly 0 / 1 at 0 / n successes (rounding would put them a hair inside)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def aggregate(episodes: Sequence[dict], wall_s: float, replay: bool = False) -> dict:
    """The report's ``aggregate``: score = mean over episodes of the max reward; success with a Wilson CI."""
    n = len(episodes)
    n_success = sum(bool(e["success"]) for e in episodes)
    lo, hi = wilson_interval(n_success, n)
    agg = {
        "mean_score": float(np.mean([e["max_reward"] for e in episodes])) if n else 0.0,
        "mean_final_reward": float(np.mean([e["final_reward"] for e in episodes])) if n else 0.0,
        "success_rate": n_success / n if n else 0.0,
        "success_ci95": [lo, hi],
        "n_episodes": n,
        "wall_s": float(wall_s),
    }
    stats = [e["executor"] for e in episodes if e.get("executor")]
    if stats:
        agg["executor"] = aggregate_stats(stats)
    if replay:
        drifts = [e["max_drift_px"] for e in episodes if e.get("max_drift_px") is not None]
        agg["replay_within_1px"] = float(np.mean([d <= 1.0 for d in drifts])) if drifts else None
        agg["replay_max_drift_px"] = float(max(drifts)) if drifts else None
        agg["replay_median_drift_px"] = float(np.median(drifts)) if drifts else None
    return agg


def format_summary(report: dict) -> str:
    """The one-line summary printed after an evaluation."""
    a = report["aggregate"]
    lo, hi = a["success_ci95"]
    n_ok = round(a["success_rate"] * a["n_episodes"])
    line = (
        f"{report['task']} | {report['policy']}: score {a['mean_score']:.3f}, "
        f"success {n_ok}/{a['n_episodes']} "
        f"({100 * a['success_rate']:.1f}%, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"
    )
    if a.get("replay_within_1px") is not None:
        line += f", replay within 1 px {100 * a['replay_within_1px']:.1f}%"
    if report.get("imagined"):
        im = report["imagined"]
        line += (
            f", IMAGINED by world model {im['world_model']} ({im['n_invalid_episodes']} invalid episode(s))"
        )
    if report.get("errors"):
        line += f", {len(report['errors'])} failed episode(s)"
    return line + f", {a['wall_s']:.1f} s"
