"""Scripted-expert rollouts into an episode store, successful episodes only (``vlaflow collect``, in
:mod:`vlaflow.cli.sim`).

Each attempt ``i`` resets the task with seed ``seed + i`` and runs the task's scripted expert
(:mod:`vlaflow.sim.experts`) until the task reports success or its step limit. Only successes are
written; attempts continue with new seeds until ``episodes`` successes or ``max_attempts`` attempts.
The store is written through :func:`vlaflow.data.store.atomic_store`, so an interrupted or failed
collection leaves no half-written store at ``--out``.

Stored per step: the observation the expert saw (``obs.state`` and, in image mode, the camera keys)
and the action it took at that observation (``obs[t]`` -> ``action[t]``). Per episode: the task's
language instruction, ``source = "sim:<task>:expert"``, ``success = True``. Root attributes record
the task spec and the seed of every stored episode (``collect.episode_seeds``), which reproduce it.
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


def rollout_expert(
    env, expert, seed: int, max_steps: int, record: bool = True, noise: float = 0.0
) -> Rollout:
    """Run ``expert`` in ``env`` from ``reset(seed=seed)`` until success or ``max_steps`` steps.

    ``noise > 0`` perturbs the *executed* end-effector motion (action dims 0-2) with Gaussian noise of
    that std while recording the expert's clean action (DART-style): the data then shows how to recover
    from small deviations, which makes cloned policies more robust. The noise is seeded by ``seed``.
    """
    obs, info = env.reset(seed=seed)
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
    return Rollout(data=data, success=success, length=length, seed=seed)


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
) -> CollectResult:
    """Collect ``episodes`` successful expert episodes of ``task`` into a new store at ``out``."""
    from tqdm import tqdm

    from vlaflow.data.store import atomic_store
    from vlaflow.sim.experts import EXPERTS, make_expert
    from vlaflow.sim.tasks import TASKS, make_env

    if task in TASKS and task not in EXPERTS:
        raise VlaflowError(
            f"collect: task {task!r} has no scripted expert; experts exist for {', '.join(EXPERTS)}"
        )
    if episodes < 1:
        raise VlaflowError(f"--episodes must be >= 1, got {episodes}")
    if not 0.0 <= noise <= 1.0:
        raise VlaflowError(f"--noise must be in [0, 1] (action units), got {noise}")
    cap = max_attempts if max_attempts is not None else 2 * episodes + 10
    if cap < episodes:
        raise VlaflowError(f"--max-attempts ({cap}) must be >= --episodes ({episodes})")
    env = make_env(task, obs_mode=obs_mode, **(env_kwargs or {}))
    t0 = time.perf_counter()
    try:
        spec = env.task_spec
        expert = make_expert(task, env)
        seeds: list[int] = []
        attempts = n_steps = 0
        attrs = {
            "env": task_attrs(spec, obs_mode),
            "collect": {"expert": f"sim:{task}:expert", "seed": seed, "noise": noise},
        }
        with atomic_store(
            out, keys=store_keys(spec), fps=spec.fps, attrs=attrs, overwrite=overwrite
        ) as store:
            bar = tqdm(total=episodes, desc=f"collect {task}", unit="ep", disable=not progress)
            while len(seeds) < episodes and attempts < cap:
                ro = rollout_expert(env, expert, seed + attempts, spec.max_steps, noise=noise)
                attempts += 1
                if ro.success:
                    store.append_episode(
                        ro.data, task=spec.instruction, source=f"sim:{task}:expert", success=True
                    )
                    seeds.append(ro.seed)
                    n_steps += ro.length
                    bar.update(1)
                bar.set_postfix(attempts=attempts, success_rate=f"{len(seeds) / attempts:.2f}")
            bar.close()
            if len(seeds) < episodes:
                raise VlaflowError(
                    f"collect {task}: only {len(seeds)} of {episodes} episodes succeeded in {attempts} "
                    f"attempts (seeds {seed}..{seed + attempts - 1}); raise --max-attempts. "
                    f"Nothing was written to {out}."
                )
            store.root.attrs.update(
                {"collect": {**attrs["collect"], "episode_seeds": seeds, "attempts": attempts}}
            )
    finally:
        env.close()
    return CollectResult(str(out), len(seeds), attempts, n_steps, time.perf_counter() - t0, seeds)
