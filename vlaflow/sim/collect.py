"""Scripted-expert rollouts into an episode store, successful episodes only (``vlaflow collect``, in
:mod:`vlaflow.cli.sim`).

Each attempt ``i`` resets the task with seed ``seed + i`` and runs the task's scripted expert
(:mod:`vlaflow.sim.experts`) until the task reports success or its step limit. Only successes are
written; attempts continue with new seeds until ``episodes`` successes or ``max_attempts`` attempts.
A new store is written at ``--out`` through the crash-safe append path, so a killed collection keeps every
finished episode there; ``--resume`` continues it with the next seeds (no seed twice); ``--overwrite`` of an
existing store writes beside it and swaps only when complete (:func:`open_destination`).

Stored per step: the observation the expert saw (``obs.state`` and, in image mode, the camera keys)
and the action it took at that observation (``obs[t]`` -> ``action[t]``). Per episode: the language
instruction (the one the env's ``reset`` returned in ``info["instruction"]``, else the task's; with
``paraphrase=True`` one of the task's declared instructions drawn by the episode's seed), ``source =
"sim:<task>:expert"``, ``success = True``. Root attributes record the task spec and the seed of every
stored episode (``collect.episode_seeds``), which reproduce it.

A task set (``mw:mt10``, ...) collects ``episodes`` successes of each member, one task after another, into
one store (the same seeds per task); ``collect.per_task`` records each task's seeds and attempts. Tasks
with held-out positions (Meta-World: seeds >= ``task_spec.extra["test_seed_start"]``) refuse those seeds,
so demonstrations never come from the evaluation split.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlaflow.errors import VlaflowError


@dataclass
class Rollout:
    """One expert episode: per-step arrays keyed like the store, and how it ended."""

    data: dict[str, np.ndarray]  # store key -> (T, *shape)
    success: bool  # the task's success test held at the last step
    length: int  # T, steps taken
    seed: int  # reset seed
    instruction: str | None = None  # the instruction the env's reset returned (info["instruction"]), if any


def rollout_expert(
    env, expert, seed: int, max_steps: int, record: bool = True, noise: float = 0.0
) -> Rollout:
    """Run ``expert`` in ``env`` from ``reset(seed=seed)`` until success or ``max_steps`` steps.

    ``noise > 0`` perturbs the *executed* end-effector motion (action dims 0-2) with Gaussian noise of
    that std while recording the expert's clean action (DART-style): the data then shows how to recover
    from small deviations, which makes cloned policies more robust. The noise is seeded by ``seed``.
    """
    obs, info = env.reset(seed=seed)
    instruction = info.get("instruction")
    expert.reset()
    rng = np.random.default_rng([seed, 7919])
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions: list[np.ndarray] = []
    success = False
    for _ in range(max_steps):
        action = np.asarray(expert.act(obs), dtype=np.float32)
        if record:
            for k, v in obs.items():
                frames[k].append(v)
            actions.append(action)
        executed = action
        if noise > 0:
            executed = action.copy()
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
        obs, _, terminated, truncated, info = env.step(executed)
        success = bool(info.get("success", False))
        if success or terminated or truncated:
            break
    length = len(actions) if record else 0
    data = {}
    if record and actions:
        data = {k: np.stack(v) for k, v in frames.items()}
        data["action"] = np.stack(actions)
    return Rollout(data=data, success=success, length=length, seed=seed, instruction=instruction)


def store_keys(spec) -> dict:
    """Store schema (key -> KeySpec) for a task spec: its observations plus the action."""
    from vlaflow.data.store import KeySpec

    keys = {}
    for k, shape in spec.obs_shapes.items():
        names = spec.extra.get("state_names") if k == "obs.state" else None
        keys[k] = KeySpec(spec.obs_dtypes[k], tuple(shape), names=list(names) if names else None)
    keys["action"] = KeySpec("float32", (spec.action_dim,), names=spec.extra.get("action_names"))
    return keys


def task_attrs(spec, obs_mode: str) -> dict:
    """JSON-safe description of a task env, stored in the store's root attributes."""
    return {
        "task": spec.name,
        "obs_mode": obs_mode,
        "fps": spec.fps,
        "action_dim": spec.action_dim,
        "action_low": list(spec.action_low),
        "action_high": list(spec.action_high),
        "max_steps": spec.max_steps,
        "instruction": spec.instruction,
        "extra": {k: v for k, v in spec.extra.items() if isinstance(v, str | int | float | bool | list)},
    }


@dataclass
class CollectResult:
    """What a collection did."""

    path: str  # the store written
    n_episodes: int  # successful episodes stored
    n_attempts: int  # episodes run
    n_steps: int  # steps stored
    wall_s: float  # seconds
    seeds: list[int] = field(default_factory=list)  # reset seed of each stored episode
    per_task: dict[str, dict] = field(default_factory=dict)  # task -> {"episodes", "attempts", "seeds"}
    kept: int = 0  # episodes that were already in the store (--resume); n_steps counts only the new ones


def episode_instruction(spec, ro: Rollout, paraphrase: bool) -> str:
    """The task text stored for one episode (see the module docstring)."""
    if ro.instruction:
        return ro.instruction
    texts = spec.extra.get("instructions") or [spec.instruction]
    if paraphrase and len(texts) > 1:
        return str(texts[int(np.random.default_rng([ro.seed, 11]).integers(len(texts)))])
    return spec.instruction


def collect(
    task: str,
    episodes: int,
    out: str,
    obs_mode: str = "lowdim",
    seed: int = 0,
    max_attempts: int | None = None,
    noise: float = 0.0,
    overwrite: bool = False,
    env_kwargs: dict | None = None,
    progress: bool = True,
    paraphrase: bool = False,
    resume: bool = False,
) -> CollectResult:
    """Collect ``episodes`` successful expert episodes of ``task`` (of each task of a task set) into the
    store at ``out`` (see :func:`open_destination` for new, resumed and replaced stores)."""
    from tqdm import tqdm

    from vlaflow.sim.experts import EXPERTS, make_expert
    from vlaflow.sim.tasks import expand_tasks, is_task_set, make_env

    tasks = expand_tasks(task)  # an unknown name lists the tasks and task sets
    missing = [t for t in tasks if t not in EXPERTS]
    if missing:
        raise VlaflowError(
            f"collect: task {', '.join(map(repr, missing))} has no scripted expert; experts exist for "
            f"{', '.join(e for e in EXPERTS if not e.startswith('mw:'))} and every mw:<name> task"
        )
    if episodes < 1:
        raise VlaflowError(f"--episodes must be >= 1, got {episodes}")
    if not 0.0 <= noise <= 1.0:
        raise VlaflowError(f"--noise must be in [0, 1] (action units), got {noise}")
    cap = max_attempts if max_attempts is not None else 2 * episodes + 10
    if cap < episodes:
        raise VlaflowError(f"--max-attempts ({cap}) must be >= --episodes ({episodes})")
    if resume and overwrite:
        raise VlaflowError(
            "give --resume (continue the store at --out) or --overwrite (replace it), not both"
        )
    t0 = time.perf_counter()
    env = make_env(tasks[0], obs_mode=obs_mode, **(env_kwargs or {}))
    spec0 = env.task_spec
    attrs = {
        "env": task_attrs(spec0, obs_mode),
        "collect": {"expert": f"sim:{task}:expert", "seed": seed, "noise": noise, "paraphrase": paraphrase},
    }
    if is_task_set(task):
        attrs["task_set"] = {"name": task, "tasks": list(tasks)}
    per_task: dict[str, dict] = {}
    n_steps = 0
    try:
        with open_destination(out, store_keys(spec0), spec0.fps, attrs, overwrite, resume) as store:
            progress_log = _resume_progress(store, tasks, attrs["collect"]) if resume else {}
            kept = store.n_episodes

            def record(name: str, seeds: list[int], attempts: int) -> None:
                # written before the episode is appended: a kill between the two leaves a seed more than
                # committed episodes, which _resume_progress trims (never an episode without its seed)
                progress_log[name] = {"attempts": attempts, "seeds": list(seeds)}
                store.root.attrs.update({"collect": {**attrs["collect"], "progress": progress_log}})

            for k, name in enumerate(tasks):
                if k > 0:
                    env.close()
                    env = make_env(name, obs_mode=obs_mode, **(env_kwargs or {}))
                spec = env.task_spec
                _check_same_schema(spec0, spec, tasks[0], name)
                test_start = spec.extra.get("test_seed_start")
                expert = make_expert(name, env)
                done = progress_log.get(name, {"attempts": 0, "seeds": []})
                seeds: list[int] = list(done["seeds"])
                attempts = int(done["attempts"])
                bar = tqdm(
                    total=episodes,
                    initial=len(seeds),
                    desc=f"collect {name}",
                    unit="ep",
                    disable=not progress,
                )
                while len(seeds) < episodes and attempts < cap + int(done["attempts"]):
                    s = seed + attempts
                    if test_start is not None and s >= test_start:
                        raise VlaflowError(
                            f"collect {name}: seed {s} is in the held-out split (seeds >= {test_start} are "
                            f"for evaluation); start lower or lower --max-attempts. "
                            + _kept(store, out, overwrite)
                        )
                    ro = rollout_expert(env, expert, s, spec.max_steps, noise=noise)
                    attempts += 1
                    if ro.success:
                        record(name, [*seeds, ro.seed], attempts)
                        text = episode_instruction(spec, ro, paraphrase)
                        store.append_episode(ro.data, task=text, source=f"sim:{name}:expert", success=True)
                        seeds.append(ro.seed)
                        n_steps += ro.length
                        bar.update(1)
                    elif attempts % 10 == 0:
                        record(name, seeds, attempts)
                    bar.set_postfix(attempts=attempts, success_rate=f"{len(seeds) / max(attempts, 1):.2f}")
                bar.close()
                record(name, seeds, attempts)
                if len(seeds) < episodes:
                    raise VlaflowError(
                        f"collect {name}: only {len(seeds)} of {episodes} episodes succeeded in {attempts} "
                        f"attempts (seeds {seed}..{seed + attempts - 1}); raise --max-attempts. "
                        + _kept(store, out, overwrite)
                    )
                per_task[name] = {"episodes": len(seeds), "attempts": attempts, "seeds": seeds}
            all_seeds = [s for r in per_task.values() for s in r["seeds"]]
            total_attempts = sum(r["attempts"] for r in per_task.values())
            collect_attrs = {
                **attrs["collect"],
                "episode_seeds": all_seeds,
                "attempts": total_attempts,
                "progress": progress_log,
            }
            if is_task_set(task):
                collect_attrs["per_task"] = per_task
            store.root.attrs.update({"collect": collect_attrs})
    finally:
        env.close()
    return CollectResult(
        str(out), len(all_seeds), total_attempts, n_steps, time.perf_counter() - t0, all_seeds, per_task, kept
    )


def _kept(store, out: str, overwrite: bool) -> str:
    n = store.n_episodes
    if overwrite or n == 0:
        return f"Nothing was written to {out}."
    return f"The {n} finished episode(s) are kept in {out}; --resume continues from there."


@contextlib.contextmanager
def open_destination(out: str, keys: dict, fps: float, attrs: dict, overwrite: bool, resume: bool):
    """The store a collection writes, by the one overwrite rule (:func:`vlaflow.atomic.check_destination`):

    - a new ``out``: created at once and written through the crash-safe append path, so a kill keeps every
      finished episode there (a failure before the first one removes the empty store again);
    - ``resume``: the existing store, appended to (its schema must match; :func:`_resume_progress` checks
      task and settings);
    - ``overwrite`` of an existing store: written beside it and swapped in only when complete
      (:func:`vlaflow.data.store.atomic_store`): the old store is never lost, and a killed run leaves its
      episodes in a temp store that ``info`` / ``validate`` report and ``repair`` removes.
    """
    from vlaflow.atomic import check_destination
    from vlaflow.data.siblings import sibling_notes
    from vlaflow.data.store import EpisodeStore, atomic_store

    for note in sibling_notes(out):
        print(f"collect: note: {note}", file=sys.stderr)
    check_destination(out, overwrite=overwrite, what="episode store", exists_ok=resume)
    path = Path(out)
    if resume and path.exists():
        store = EpisodeStore.open(out, mode="a")
        have = {k: (s.dtype, tuple(s.shape)) for k, s in store.keys.items()}
        want = {k: (s.dtype, tuple(s.shape)) for k, s in keys.items()}
        if have != want:
            store.close()
            raise VlaflowError(f"collect --resume: {out} has keys {have}, this collection records {want}")
        with store:
            yield store
        return
    if path.exists():  # --overwrite
        with atomic_store(out, keys=keys, fps=fps, attrs=attrs, overwrite=True) as store:
            yield store
        return
    store = EpisodeStore.create(out, keys=keys, fps=fps, attrs=attrs)
    try:
        yield store
    except BaseException:
        empty = store.n_episodes == 0
        store.close()
        if empty:
            shutil.rmtree(out, ignore_errors=True)
        raise
    store.close()


def _resume_progress(store, tasks: list[str], settings: dict) -> dict[str, dict]:
    """Seeds and attempts per task of the collection being resumed, trimmed to the committed episodes.

    The store must come from a collection of the same task with the same seed, noise and instruction
    setting: otherwise resumed episodes would not be the ones a fresh run would store.
    """
    have = dict(store.attrs.get("collect") or {})
    wrong = {k: (have.get(k), v) for k, v in settings.items() if have.get(k) != v}
    if wrong:
        listed = ", ".join(f"{k}: store {a!r}, now {b!r}" for k, (a, b) in wrong.items())
        raise VlaflowError(f"collect --resume: {store.path} was collected with other settings ({listed})")
    log = dict(have.get("progress") or {})
    if not log and have.get("episode_seeds") is not None:  # a finished store from before progress logs
        per = have.get("per_task") or {
            tasks[0]: {"seeds": have["episode_seeds"], "attempts": have["attempts"]}
        }
        log = {t: {"seeds": r["seeds"], "attempts": r["attempts"]} for t, r in per.items()}
    sources = [store.episode_meta(i)["source"] for i in range(store.n_episodes)]
    for name in tasks:
        entry = log.get(name, {"attempts": 0, "seeds": []})
        committed = sources.count(f"sim:{name}:expert")
        if committed > len(entry["seeds"]):
            raise VlaflowError(
                f"collect --resume: {store.path} holds {committed} episodes of {name} but records "
                f"{len(entry['seeds'])} seeds; it cannot be continued without repeating seeds"
            )
        attempts = int(entry["attempts"])
        if committed < len(entry["seeds"]):
            # killed between recording a seed and committing its episode: that attempt runs again (seed
            # ``seed + attempts``), so the resumed store holds the seeds an uninterrupted run stores
            attempts = int(entry["seeds"][committed]) - int(settings["seed"])
        log[name] = {"attempts": attempts, "seeds": list(entry["seeds"][:committed])}
    return log


def _check_same_schema(first, spec, first_name: str, name: str) -> None:
    """Every task of one store needs the same keys, shapes and action size (one schema per store)."""
    a = (dict(first.obs_shapes), first.action_dim, first.fps)
    b = (dict(spec.obs_shapes), spec.action_dim, spec.fps)
    if a != b:
        raise VlaflowError(
            f"collect: {name} does not fit one store with {first_name}: "
            f"(obs shapes, action dim, fps) {b} vs {a}"
        )
