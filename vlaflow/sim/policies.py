"""Policies the evaluation harness can build by name: ``random``, ``replay:STORE``, or a checkpoint directory.

All follow :class:`vlaflow.interfaces.RuntimePolicy` (``config``, ``infer(obs) -> InferResult`` holding an
(H, Da) chunk, ``reset``). The harness seeds every episode through :func:`reset_policy`, so a stochastic
policy draws the same noise for the same episode seed whichever worker runs it.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path

import numpy as np

from vlaflow.errors import VlaflowError
from vlaflow.interfaces import InferResult, RuntimeSpec, TaskSpec

REPLAY_PREFIX = "replay:"
ONNX_PREFIX = "onnx:"  # an exported policy (vlaflow export) run by the torch-free onnxruntime runtime


class RandomPolicy:
    """Uniform random actions in the task's action bounds, ignoring observations; seeded by ``reset(seed)``.

    A baseline and a test fixture: on PushT it scores near 0.
    """

    def __init__(self, task_spec: TaskSpec, horizon: int = 8, n_action_steps: int = 8, seed: int = 0):
        self.config = RuntimeSpec(
            n_obs_steps=1,
            horizon=horizon,
            n_action_steps=n_action_steps,
            obs_shapes={},
            action_dim=task_spec.action_dim,
            fps=task_spec.fps,
        )
        self._low = np.asarray(task_spec.action_low, dtype=np.float64)
        self._high = np.asarray(task_spec.action_high, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def infer(self, obs: dict[str, np.ndarray], *, shift=None, delay=None) -> InferResult:
        h, da = self.config.horizon, self.config.action_dim
        return InferResult(self._rng.uniform(self._low, self._high, size=(h, da)).astype(np.float32), nfe=0)


class ReplayPolicy:
    """Open-loop replay of a store's recorded actions, one episode at a time (see :meth:`load_episode`).

    Reads ``action`` and the state (``obs.state``, or ``state`` in a raw diffusion_policy store) of every
    episode once, up front; images are never read. ``infer`` returns the next H recorded actions (the last
    one repeated past the end) and advances by Ta.
    """

    STATE_KEYS = ("obs.state", "state")

    def __init__(self, store_path: str | os.PathLike, chunk: int = 8):
        from vlaflow.data.store import EpisodeStore

        self.store_path = str(store_path)
        store = EpisodeStore.open(store_path)
        store.require_intact()  # missing chunks would read as zeros: refuse before any work
        keys = store.keys
        if "action" not in keys:
            raise VlaflowError(f"{store_path}: replay needs an 'action' key; the store has {sorted(keys)}")
        self.state_key = next((k for k in self.STATE_KEYS if k in keys), None)
        if self.state_key is None:
            raise VlaflowError(
                f"{store_path}: replay needs a recorded start state ({' or '.join(self.STATE_KEYS)}); "
                f"the store has {sorted(keys)}"
            )
        if store.n_episodes == 0:
            raise VlaflowError(f"{store_path}: the store has no finished episodes to replay")
        self.episode_ends = store.episode_ends
        self._actions = store.read("action").astype(np.float64)
        self._states = store.read(self.state_key).astype(np.float64)
        self.fps = store.fps
        self.config = RuntimeSpec(
            n_obs_steps=1,
            horizon=chunk,
            n_action_steps=chunk,
            obs_shapes={},
            action_dim=int(self._actions.shape[1]),
            fps=float(self.fps or 0.0) or 1.0,
        )
        self._episode: np.ndarray | None = None
        self._cursor = 0

    @property
    def n_episodes(self) -> int:
        return int(len(self.episode_ends))

    def episode_length(self, i: int) -> int:
        return int(self.episode_ends[i] - (self.episode_ends[i - 1] if i > 0 else 0))

    def load_episode(self, i: int) -> dict[str, np.ndarray]:
        """Select episode ``i`` to replay; returns its recorded ``action`` and ``obs.state`` (T, ...)."""
        if not 0 <= i < self.n_episodes:
            raise VlaflowError(f"{self.store_path}: episode {i} out of range (store has {self.n_episodes})")
        sl = slice(int(self.episode_ends[i - 1]) if i > 0 else 0, int(self.episode_ends[i]))
        self._episode = self._actions[sl]
        self._cursor = 0
        return {"action": self._episode, "obs.state": self._states[sl]}

    def reset(self, seed: int | None = None) -> None:
        self._cursor = 0

    def infer(self, obs: dict[str, np.ndarray], *, shift=None, delay=None) -> InferResult:
        if self._episode is None:
            raise VlaflowError("ReplayPolicy.infer called before load_episode")
        h = self.config.horizon
        idx = np.minimum(np.arange(self._cursor, self._cursor + h), len(self._episode) - 1)
        self._cursor += self.config.n_action_steps
        return InferResult(self._episode[idx], nfe=0)  # (H, Da)


def load_checkpoint_policy(path: str | os.PathLike, device: str = "cpu"):
    """A trained policy from a checkpoint directory, through :func:`vlaflow.load_policy`."""
    p = Path(path)
    if not p.is_dir():
        raise VlaflowError(
            f"policy {str(path)!r}: not a checkpoint directory, and not 'random' or '{REPLAY_PREFIX}STORE'"
        )
    from vlaflow.policies.runtime import load_policy

    try:
        return load_policy(p, device=device)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vlaflow"):
            raise VlaflowError(f"{p}: checkpoint loading is not available in this build ({e})") from e
        raise


def build_policy(spec, task_spec: TaskSpec, device: str = "cpu"):
    """A policy from ``spec``: "random", "replay:STORE", "onnx:DIR", a checkpoint path, or a factory."""
    if isinstance(spec, str | os.PathLike):
        s = str(spec)
        if s == "random":
            return RandomPolicy(task_spec)
        if s.startswith(REPLAY_PREFIX):
            return ReplayPolicy(s[len(REPLAY_PREFIX) :])
        if s.startswith(ONNX_PREFIX):
            from vlaflow.deploy.onnx_runtime import OnnxPolicy

            return OnnxPolicy(s[len(ONNX_PREFIX) :])
        return load_checkpoint_policy(s, device=device)
    if callable(spec):
        return spec()
    raise VlaflowError(f"cannot build a policy from {type(spec).__name__} {spec!r}")


def describe_policy(spec) -> str:
    """A short name for reports."""
    if isinstance(spec, str | os.PathLike):
        return str(spec)
    if isinstance(spec, functools.partial):  # e.g. partial(load_policy, CKPT, ...): name it by its checkpoint
        first = spec.args[0] if spec.args else None
        return str(first) if isinstance(first, str | os.PathLike) else describe_policy(spec.func)
    return getattr(spec, "__name__", None) or type(spec).__name__


def reset_policy(policy, seed: int) -> None:
    """Start an episode: seed Python, NumPy and (when loaded) torch, then call ``policy.reset(seed=seed)``.

    Every runtime policy takes ``reset(seed=None)`` (:class:`vlaflow.interfaces.RuntimePolicy`); the global
    seeding covers policies that also draw from the global generators.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if sys.modules.get("torch") is not None:  # None: a torch-free process that blocked the import
        sys.modules["torch"].manual_seed(seed)
    reset = getattr(policy, "reset", None)
    if reset is not None:
        reset(seed=seed)


def check_compatible(policy_spec: RuntimeSpec, task_spec: TaskSpec, policy_name: str) -> None:
    """Raise one error listing both sides when the policy's obs keys/shapes or Da don't fit the task."""
    problems = []
    for k, shape in policy_spec.obs_shapes.items():
        if k not in task_spec.obs_shapes:
            problems.append(f"{k} is not provided by the task")
        elif tuple(task_spec.obs_shapes[k]) != tuple(shape):
            problems.append(
                f"{k}: policy expects {tuple(shape)}, task gives {tuple(task_spec.obs_shapes[k])}"
            )
    if policy_spec.action_dim != task_spec.action_dim:
        problems.append(
            f"action dim: policy gives {policy_spec.action_dim}, task expects {task_spec.action_dim}"
        )
    if not problems:
        return

    def fmt(shapes: dict, da: int) -> str:
        keys = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) or "(no observations)"
        return f"{keys}; action dim {da}"

    mode = task_spec.extra.get("obs_mode", "")
    raise VlaflowError(
        f"policy {policy_name!r} does not fit task {task_spec.name!r}"
        + (f" (obs mode {mode})" if mode else "")
        + ":\n  policy needs:  "
        + fmt(policy_spec.obs_shapes, policy_spec.action_dim)
        + "\n  task provides: "
        + fmt(task_spec.obs_shapes, task_spec.action_dim)
        + "\n  mismatch: "
        + "; ".join(problems)
    )
