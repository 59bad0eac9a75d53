"""Scripted-expert rollouts into an episode store, successful episodes only (``vlaflow collect``, in
:mod:`vlaflow.cli.sim`).

Each attempt ``i`` resets the task with seed ``seed + i`` and runs the task's scripted expert
(:mod:`vlaflow.sim.experts`) until the task reports success or its step limit. Only successes are
written; attempts continue with new seeds until ``episodes`` successes or ``max_attempts`` attempts.
The store is written through :func:`vlaflow.data.store.atomic_store`, so an interrupted or failed
collection leaves no half-written store at ``--out``.

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

import time
from dataclasses import dataclass, field

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
) -> CollectResult:
    """Collect ``episodes`` successful expert episodes of ``task`` (of each task of a task set) into a new
    store at ``out``."""
    from tqdm import tqdm

    from vlaflow.data.store import atomic_store
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
    t0 = time.perf_counter()
    env = make_env(tasks[0], obs_mode=obs_mode, **(env_kwargs or {}))
    spec0 = env.task_spec
    all_seeds: list[int] = []
    per_task: dict[str, dict] = {}
    n_steps = total_attempts = 0
    attrs = {
        "env": task_attrs(spec0, obs_mode),
        "collect": {"expert": f"sim:{task}:expert", "seed": seed, "noise": noise, "paraphrase": paraphrase},
    }
    if is_task_set(task):
        attrs["task_set"] = {"name": task, "tasks": list(tasks)}
    try:
        with atomic_store(
            out, keys=store_keys(spec0), fps=spec0.fps, attrs=attrs, overwrite=overwrite
        ) as store:
            for k, name in enumerate(tasks):
                if k > 0:
                    env.close()
                    env = make_env(name, obs_mode=obs_mode, **(env_kwargs or {}))
                spec = env.task_spec
                _check_same_schema(spec0, spec, tasks[0], name)
                test_start = spec.extra.get("test_seed_start")
                expert = make_expert(name, env)
                seeds: list[int] = []
                attempts = 0
                bar = tqdm(total=episodes, desc=f"collect {name}", unit="ep", disable=not progress)
                while len(seeds) < episodes and attempts < cap:
                    s = seed + attempts
                    if test_start is not None and s >= test_start:
                        raise VlaflowError(
                            f"collect {name}: seed {s} is in the held-out split (seeds >= {test_start} are "
                            f"for evaluation); start lower or lower --max-attempts. Nothing was written."
                        )
                    ro = rollout_expert(env, expert, s, spec.max_steps, noise=noise)
                    attempts += 1
                    if ro.success:
                        text = episode_instruction(spec, ro, paraphrase)
                        store.append_episode(ro.data, task=text, source=f"sim:{name}:expert", success=True)
                        seeds.append(ro.seed)
                        n_steps += ro.length
                        bar.update(1)
                    bar.set_postfix(attempts=attempts, success_rate=f"{len(seeds) / attempts:.2f}")
                bar.close()
                total_attempts += attempts
                if len(seeds) < episodes:
                    raise VlaflowError(
                        f"collect {name}: only {len(seeds)} of {episodes} episodes succeeded in {attempts} "
                        f"attempts (seeds {seed}..{seed + attempts - 1}); raise --max-attempts. "
                        f"Nothing was written to {out}."
                    )
                per_task[name] = {"episodes": len(seeds), "attempts": attempts, "seeds": seeds}
                all_seeds += seeds
            collect_attrs = {**attrs["collect"], "episode_seeds": all_seeds, "attempts": total_attempts}
            if is_task_set(task):
                collect_attrs["per_task"] = per_task
            store.root.attrs.update({"collect": collect_attrs})
    finally:
        env.close()
    return CollectResult(
        str(out), len(all_seeds), total_attempts, n_steps, time.perf_counter() - t0, all_seeds, per_task
    )


def _check_same_schema(first, spec, first_name: str, name: str) -> None:
    """Every task of one store needs the same keys, shapes and action size (one schema per store)."""
    a = (dict(first.obs_shapes), first.action_dim, first.fps)
    b = (dict(spec.obs_shapes), spec.action_dim, spec.fps)
    if a != b:
        raise VlaflowError(
            f"collect: {name} does not fit one store with {first_name}: "
            f"(obs shapes, action dim, fps) {b} vs {a}"
        )
