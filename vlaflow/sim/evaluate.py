"""Rollout evaluation of a policy, :func:`evaluate` (the ``vlaflow eval`` command: :mod:`vlaflow.cli.sim`).

    vlaflow eval --task pusht --policy CKPT|replay:STORE|random --episodes 50 --seed 100000 \
        --workers 2 --out DIR

PushT defaults follow the Diffusion Policy paper: seeds 100000..100049, at most 300 steps at 10 Hz,
score = mean over episodes of the max reward clip(coverage / 0.95, 0, 1); success (coverage > 0.95) is
reported beside it. ``replay:STORE`` replays each recorded episode open-loop from its recorded start state
(episodes in store order; seeds play no part) and reports the block drift against the recording.

Task sets run task by task in one worker pool, with a per-task table in the summary::

    vlaflow eval --task mw:mt10 --policy CKPT --episodes-per-task 50 --workers 2 --out DIR \
        [--instruction "open the drawer"] [--allow-unseen-tasks]

An imagined task ``--task wm:WM_CKPT`` (:mod:`vlaflow.sim.imagined`) evaluates the policy inside a world
model, started from the real task's resets with the same seeds; the report's ``imagined`` entry says so
(model, reward, number of episodes ended as invalid: NaN or out of the data range).

Meta-World seeds from 100000 on (the default) draw held-out goal/object positions
(:mod:`vlaflow.sim.metaworld_tasks`); each episode's ``goal_split`` says which positions it used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from vlaflow.errors import ConfigError

DEFAULT_START_SEED = 100000
DEFAULT_EPISODES = 50
OBS_MODE_CHOICES = ("auto", "lowdim", "image")

if TYPE_CHECKING:
    from vlaflow.sim.realtime import SimRealtimeConfig


def _choose_obs_mode(obs_mode: str, policy_spec) -> tuple[str, int | None]:
    """("lowdim"|"image", camera size or None): "auto" picks image mode when the policy reads a camera."""
    from vlaflow.keys import is_image

    images = {k: v for k, v in policy_spec.obs_shapes.items() if is_image(k)}
    sizes = {tuple(v[:2]) for v in images.values()}
    ((h, w),) = sizes if len(sizes) == 1 else ((None, None),)
    render_size = h if h == w else None  # envs render square cameras; else keep the task's default size
    if obs_mode == "auto":
        obs_mode = "image" if images else "lowdim"
    # An explicit mode is the task factory's to validate (tasks may offer more than lowdim / image).
    return obs_mode, render_size if images and obs_mode != "lowdim" else None


@dataclasses.dataclass(frozen=True)
class JobList(Sequence):
    """The episodes of one evaluation, each made when it is asked for: ``--episodes 10**9`` costs no
    memory before the first rollout (the harness takes jobs one at a time).

    Job ``k * len(seeds) + i`` is seed ``seeds[i]`` on ``tasks[k]`` (``None``: the setup's single task);
    a replay's job ``i`` replays store episode ``i``.
    """

    seeds: Sequence[int]  # a range for the usual consecutive seeds
    tasks: tuple[str | None, ...]
    limits: tuple[int, ...]  # step limit per task
    videos: int  # the first ``videos`` episodes of each task are filmed
    replay: bool = False

    def __len__(self) -> int:
        return len(self.tasks) * len(self.seeds)

    def __getitem__(self, i):
        from vlaflow.sim.harness import EpisodeJob

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"job {i} of {n}")
        k, j = divmod(i, len(self.seeds))
        seed = int(self.seeds[j])
        return EpisodeJob(
            i,
            seed,
            self.limits[k],
            video=j < self.videos,
            replay_episode=j if self.replay else None,
            task=self.tasks[k],
        )


def cap_workers(workers: int, n_jobs: int) -> int:
    """``workers`` capped at the CPUs this process may use (more processes only contend), with a note."""
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cpu = os.cpu_count() or 1
    if workers > n_cpu:
        print(f"eval: --workers {workers} > the {n_cpu} CPU(s) here; using {n_cpu}", file=sys.stderr)
        return n_cpu
    return workers


def _versions() -> dict[str, str]:
    from importlib import metadata

    # the installed distribution's version (pyproject's), not an import of the root package (a layer edge)
    out = {"python": sys.version.split()[0]}
    for pkg in (
        "vlaflow",
        "numpy",
        "gymnasium",
        "gym-pusht",
        "pymunk",
        "torch",
        "av",
        "mujoco",
        "metaworld",
        "pybullet",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate(
    policy,
    task: str = "pusht",
    seeds: Sequence[int] | None = None,
    workers: int = 1,
    out_dir: str | os.PathLike | None = None,
    *,
    n_episodes: int | None = None,
    start_seed: int = DEFAULT_START_SEED,
    max_steps: int | None = None,
    videos: int = 0,
    obs_mode: str = "auto",
    device: str = "cpu",
    env_kwargs: dict | None = None,
    executor: str = "sync",
    realtime: SimRealtimeConfig | None = None,
    progress: bool = True,
    start_method: str = "spawn",
    instruction: str | None = None,
    allow_unseen_tasks: bool = False,
    record: str | os.PathLike | None = None,
    record_only_success: bool = False,
    record_append: bool = False,
) -> dict:
    """Evaluate ``policy`` on ``task`` by rollouts; returns the report (also written to out_dir/report.json).

    ``policy``: "random", "replay:STORE", a checkpoint directory, a zero-argument factory returning a
    RuntimePolicy (built inside each worker; must be picklable), or a RuntimePolicy object (run in this
    process, whatever ``workers`` says). ``seeds`` default to ``start_seed`` + 0..n_episodes-1 (50 episodes);
    a replay runs the store's first ``n_episodes`` episodes (all by default). ``workers=0`` runs in-process.
    Videos of the first ``videos`` episodes go to out_dir/videos/.

    A task set (``mw:mt10``, ``probe:two_cubes``; :data:`vlaflow.sim.tasks.TASK_SETS`) runs every member with
    the same seeds: ``n_episodes`` and ``videos`` count per task, all jobs share one worker pool, and the
    report adds ``tasks``, ``per_task`` (success with a Wilson interval per task) and an ``aggregate`` whose
    success rate is the mean over tasks (:mod:`vlaflow.sim.multitask`; ``summary.md`` holds the table).

    ``instruction`` replaces every task's instruction for a language-conditioned policy (tell it another
    task in the same scene). A policy trained on some instructions is refused on tasks none of whose
    instructions it saw, unless ``allow_unseen_tasks`` (then the report lists them as ``unseen_tasks``).

    ``record``: an episode store that every finished episode is appended to as it ends (each observation
    key of the task spec, the executed action, the instruction, ``source = "policy:eval:<policy>"`` and
    the episode's success), for filtered imitation, DAgger-style data or RL-100's merge of policy data into
    the demonstrations. A new store unless ``record_append`` (then an existing one of the same schema, e.g.
    a copy of the demonstrations, is appended to); ``record_only_success`` keeps successful episodes only.
    A kill keeps every episode appended before it; the store's ``eval_record`` attribute lists each
    recording's policy, seeds (in store order) and the number of episodes left out.

    ``executor``: "sync" (infer, execute chunk[0:Ta], replan) or "realtime" (the deploy executor core on the
    sim clock with simulated latency; its settings are ``realtime``, a
    :class:`vlaflow.sim.realtime.SimRealtimeConfig`). Each episode's executor statistics are in its
    ``"executor"`` entry and summed/averaged in ``aggregate["executor"]``.
    """
    from vlaflow.sim import multitask
    from vlaflow.sim.harness import EXECUTORS, EvalSetup, aggregate, run_jobs
    from vlaflow.sim.policies import ReplayPolicy, build_policy, check_compatible, describe_policy
    from vlaflow.sim.realtime import SimRealtimeConfig
    from vlaflow.sim.tasks import expand_tasks, is_task_set, make_env

    t0 = time.perf_counter()
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if n_episodes is not None and n_episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {n_episodes}")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if videos < 0:
        raise ConfigError(f"videos must be >= 0, got {videos}")
    if videos and out_dir is None:
        raise ConfigError("videos need an output directory (out_dir)")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if realtime is not None and executor != "realtime":
        raise ConfigError(f"realtime settings are for executor='realtime', got executor={executor!r}")
    if realtime is not None and not isinstance(realtime, SimRealtimeConfig):
        raise ConfigError(f"realtime must be a SimRealtimeConfig, got {type(realtime).__name__}")
    if instruction is not None and not str(instruction).strip():
        raise ConfigError("instruction must be a non-empty sentence (or None for each task's own)")
    if executor == "realtime" and realtime is None:
        realtime = SimRealtimeConfig()
    tasks = expand_tasks(task)  # an unknown name lists the tasks and task sets
    multi = is_task_set(task)

    # Build the policy here once: its RuntimeSpec decides the obs mode and is checked against every task
    # before any worker starts. (Workers build their own copy from the same spec.)
    probe_kwargs = {"obs_mode": "lowdim" if obs_mode == "auto" else obs_mode, **(env_kwargs or {})}
    probe = make_env(tasks[0], **probe_kwargs)
    try:
        in_memory = hasattr(policy, "infer")
        policy_obj = policy if in_memory else build_policy(policy, probe.task_spec, device=device)
        specs = {tasks[0]: probe.task_spec}
    finally:
        probe.close()
    name = describe_policy(policy)
    mode, render_size = _choose_obs_mode(obs_mode, policy_obj.config)
    kwargs = {"obs_mode": mode, **({"render_size": render_size} if render_size else {}), **(env_kwargs or {})}
    for t in tasks:  # each task's spec in the policy's obs variant (one env build each)
        if t not in specs or kwargs != probe_kwargs:
            env = make_env(t, **kwargs)
            try:
                specs[t] = env.task_spec
            finally:
                env.close()
    for t in tasks:
        check_compatible(policy_obj.config, specs[t], name)
    if instruction is not None and not policy_obj.config.task:
        raise ConfigError(
            f"--instruction {instruction!r} was given, but policy {name!r} is not language-conditioned "
            "(its RuntimeSpec has no default task), so it would be ignored"
        )
    trained = multitask.trained_instructions(policy_obj)
    unseen = multitask.unseen_tasks(trained, specs)
    if unseen and not allow_unseen_tasks:
        multitask.refuse_unseen(name, trained, unseen, tasks)

    replay = isinstance(policy_obj, ReplayPolicy)
    if record is not None and replay:
        raise ConfigError("a replay is not recorded: its episodes are already in the store it replays")
    if (record_only_success or record_append) and record is None:
        raise ConfigError("record_only_success / record_append need a store to record to (record=...)")
    task_spec = specs[tasks[0]]
    limit = max_steps or task_spec.max_steps
    if replay:
        if multi:
            raise ConfigError(f"a replay runs one store on one task, not the task set {task!r}")
        n = policy_obj.n_episodes if n_episodes is None else min(n_episodes, policy_obj.n_episodes)
        jobs = JobList(range(n), (None,), (max_steps or 10**9,), videos, replay=True)
    else:
        if seeds is None:
            seeds = range(start_seed, start_seed + (n_episodes or DEFAULT_EPISODES))
        elif n_episodes is not None:
            seeds = seeds[:n_episodes] if isinstance(seeds, range) else list(seeds)[:n_episodes]
        if not isinstance(seeds, range):
            seeds = [int(s) for s in seeds]
        if multi:
            jobs = JobList(seeds, tuple(tasks), tuple(max_steps or specs[t].max_steps for t in tasks), videos)
        else:
            jobs = JobList(seeds, (None,), (limit,), videos)
    workers = cap_workers(workers, len(jobs))
    if not jobs:
        raise ConfigError("no episodes to evaluate (empty seed list)")

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").unlink(missing_ok=True)  # a failed run must not leave an old report looking new
    setup = EvalSetup(
        task=task,
        env_kwargs=kwargs,
        policy=policy if not in_memory else None,
        device=device,
        executor=executor,
        realtime=realtime,
        video_dir=str(out / "videos") if out is not None and videos else None,
        instruction=instruction,
        record=record is not None,
    )
    # Reuse the already-built policy when running in-process; workers rebuild from the spec.
    local = policy_obj if (in_memory or workers == 0) else None
    rec = _recording(record, specs, mode, name, record_only_success, record_append) if record else None
    with rec or contextlib.nullcontext() as recorder:
        episodes, errors = run_jobs(
            setup,
            jobs,
            workers,
            policy=local,
            progress=progress,
            start_method=start_method,
            on_episode=recorder.on_episode if recorder else None,
        )

    spec = policy_obj.config
    report = {
        "task": task,
        "policy": name,
        "obs_mode": mode,
        "workers": 0 if local is not None else min(workers, len(jobs)),
        "max_steps": None if replay and max_steps is None else limit,
        "executor": executor,
        **({"realtime": dataclasses.asdict(realtime)} if realtime is not None else {}),
        **({"instruction": instruction} if instruction is not None else {}),
        **({"unseen_tasks": unseen} if unseen else {}),
        "runtime": {
            "n_obs_steps": spec.n_obs_steps,
            "horizon": spec.horizon,
            "n_action_steps": spec.n_action_steps,
        },
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "episodes": episodes,
        "errors": errors,
        "aggregate": aggregate(episodes, time.perf_counter() - t0, replay=replay),
        "videos": [e["video"] for e in episodes if "video" in e],
    }
    imagined = task_spec.extra.get("imagined")
    if imagined is not None:  # a world model's imagination, not the simulator (vlaflow.sim.imagined)
        report["imagined"] = {
            **imagined,
            "n_invalid_episodes": sum(
                e.get("metrics", {}).get("imagined_invalid", 0.0) > 0 for e in episodes
            ),
            "real_env_steps": 0,
        }
    if multi:
        report["tasks"] = list(tasks)
        report["episodes_per_task"] = len(seeds)
        report["seeds"] = [seeds[0], seeds[-1]] if seeds else []
        report["per_task"] = multitask.per_task_report(tasks, episodes, errors, specs)
        report["aggregate"] = multitask.average(report["per_task"], episodes, time.perf_counter() - t0)
    report["aggregate"]["n_errors"] = len(errors)
    if recorder:
        report["recorded"] = recorder.log
    if out is not None:
        if multi:
            (out / "summary.md").write_text(f"# {task} | {name}\n\n{multitask.format_table(report)}\n")
        _write_json_atomic(out / "report.json", report)
    return report


class _Recorder:
    """Appends recorded episodes (the harness's ``TRACE_KEY`` entry) to an open store as they finish."""

    def __init__(self, store, path, specs: dict, policy_name: str, only_success: bool):
        self.store, self.specs, self.spec = store, specs, next(iter(specs.values()))
        self.source = f"policy:eval:{policy_name}"
        self.log = {"store": str(path), "policy": policy_name, "only_success": only_success}
        self.log.update(seeds=[], left_out=0)

    def on_episode(self, job, result: dict) -> None:
        from vlaflow.sim.harness import TRACE_KEY

        trace = result.pop(TRACE_KEY, None)
        if trace is None:
            return
        if self.log["only_success"] and not result["success"]:
            self.log["left_out"] += 1
            return
        text = result.get("instruction") or self.specs.get(job.task or self.spec.name, self.spec).instruction
        self.store.append_episode(trace, task=text, source=self.source, success=bool(result["success"]))
        self.log["seeds"].append(int(job.seed))


@contextlib.contextmanager
def _recording(path, specs: dict, obs_mode: str, policy_name: str, only_success: bool, append: bool):
    """The :class:`_Recorder` of ``evaluate(record=...)`` on its store (the first task's schema, checked
    against an appended store); its log goes to the store's ``eval_record`` attribute at the end."""
    from vlaflow.sim.collect import open_destination, store_keys, task_attrs

    spec = next(iter(specs.values()))
    keys = store_keys(spec)
    for t, sp in specs.items():
        if store_keys(sp) != keys:
            raise ConfigError(f"record: task {t} records another schema than {spec.name}: one store each")
    attrs = {"env": task_attrs(spec, obs_mode)}
    with open_destination(str(path), keys, spec.fps, attrs, overwrite=False, resume=append) as store:
        earlier = list(store.attrs.get("eval_record") or [])
        rec = _Recorder(store, path, specs, policy_name, only_success)
        try:
            yield rec
        finally:
            store.root.attrs.update({"eval_record": [*earlier, rec.log]})
