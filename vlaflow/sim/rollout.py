"""Vectorized sim envs for RL rollouts: N episodes in worker processes, stepped a chunk at a time.

:class:`SubprocChunkEnv` implements :class:`vlaflow.rl.rollout.ChunkVecEnv`: W worker processes each hold
N / W envs of the task and keep each env's obs window (To steps, the first observation repeated at the
start, as :class:`~vlaflow.deploy.sync_chunk.SyncChunkExecutor` does); the parent sends every env's chunk at
once, a worker executes Ta steps per env and sends back the windows, the summed task reward, done and
success. Inference stays in the parent, batched across all N envs. Only tasks that declare a reward and a
success signal (:data:`REWARD_TASKS`, checked against the env's ``task_spec.extra``) are accepted.

With ``record=True`` every env also records its episodes step by step -- every observation key the env
returns (the store schema's obs keys), the executed action, the reward and the episode's success -- and
:meth:`SubprocChunkEnv.take_episodes` hands over the finished ones (for an episode store: RL-100 merges
its policy's rollouts into a copy of the demonstrations). An episode cut by a ``reset`` before it ended is
dropped, not recorded as finished.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Sequence

import numpy as np

from vlaflow.errors import VlaflowError
from vlaflow.sim.harness import WORKER_THREAD_ENV, _environ, _short_tb

# task -> what its per-step reward is (RL needs a reward and a success signal from the task itself)
REWARD_TASKS: dict[str, str] = {
    "pusht": "clip(coverage / 0.95, 0, 1) per step; success: coverage > 0.95",
    "pick_place": "1 at the step the cube rests released inside the tray, which ends the episode (a success "
    "read from contacts and velocities, not from the stored state)",
}


# tasks whose only reward is 1 at the step the task succeeds, which ends the episode: a stored episode's
# rewards follow from its success flag, when every stored episode ends at that step (vlaflow collect,
# eval --record and the RL rollouts all stop there)
SUCCESS_ENDS_EPISODE = ("pick_place",)


def stored_step_rewards(task: str, episode: dict[str, np.ndarray], success: bool | None = None) -> np.ndarray:
    """(T,) the reward the sim gave each step of a stored episode (demonstrations record none).

    From its states where the task's reward is a function of the state (PushT: step t is scored on the
    state after its action, row t + 1; the last row repeats). For a task whose reward is 1 at the success
    that ends the episode (:data:`SUCCESS_ENDS_EPISODE`), from the episode's ``success`` flag: 1 at its last
    step if it succeeded, else 0 everywhere; an unknown flag is refused."""
    check_reward_task(task)
    if task in SUCCESS_ENDS_EPISODE:
        n = next((len(v) for v in episode.values()), 0)
        if success is None or n == 0:
            raise VlaflowError(
                f"{task} rewards of a stored episode come from its success flag ({REWARD_TASKS[task]}); "
                + ("the episode has no steps" if n == 0 else "this episode's success is unknown")
                + ". Store the reward per step (the 'reward' key) or record episodes that say whether they "
                "succeeded (vlaflow collect, vlaflow eval --record)"
            )
        r = np.zeros(n, np.float32)
        r[-1] = float(bool(success))
        return r
    # (torch-free module: the rollout workers import it; the reward module imports torch)
    from vlaflow.world_models.reward import TASK_REWARDS

    if task not in TASK_REWARDS:
        raise VlaflowError(
            f"no reward from stored states is defined for {task!r} (defined for: {', '.join(TASK_REWARDS)}); "
            f"its reward: {REWARD_TASKS[task]}. Store the reward per step (the 'reward' key) to use its "
            "episodes offline"
        )
    if "obs.state" not in episode:
        raise VlaflowError(
            f"{task} rewards of stored steps need 'obs.state'; the episode has {sorted(episode)}"
        )
    r, _ = TASK_REWARDS[task](episode["obs.state"])
    return np.concatenate([r[1:], r[-1:]]).astype(np.float32)


def check_reward_task(task: str) -> None:
    """Refuse a task without a reward/success signal, listing the tasks that have one."""
    if task not in REWARD_TASKS:
        raise VlaflowError(
            f"task {task!r} has no reward/success signal for RL; tasks with one: "
            + "; ".join(f"{k} ({v})" for k, v in REWARD_TASKS.items())
        )


class _Slot:
    """One env and its obs window inside a worker."""

    def __init__(self, env, keys: Sequence[str], to: int, max_steps: int, record: bool = False):
        self.env, self.keys, self.to, self.max_steps = env, tuple(keys), to, max_steps
        self.window: deque = deque(maxlen=to)
        self.done, self.success, self.t = True, False, 0
        self.record = record
        self.rec: dict | None = None  # the episode being recorded
        self.finished: list[dict] = []  # recorded episodes that ended, until taken

    def reset(self, seed: int, state=None) -> dict:
        options = None if state is None else {"reset_to_state": np.asarray(state, np.float64)}
        obs, _ = self.env.reset(seed=int(seed), options=options)
        self.window.clear()
        self.window.extend([{k: obs[k] for k in self.keys}] * self.to)
        self.done, self.success, self.t = False, False, 0
        if self.record:
            self.rec = {"seed": int(seed), "obs": [obs], "action": [], "reward": []}
        return self.obs()

    def _finish(self) -> None:
        rec, self.rec = self.rec, None
        obs = {k: np.stack([o[k] for o in rec["obs"]]) for k in rec["obs"][0]}
        self.finished.append(
            {
                "seed": rec["seed"],
                "obs": obs,
                "action": np.asarray(rec["action"], np.float32),
                "reward": np.asarray(rec["reward"], np.float32),
                "success": bool(self.success),
            }
        )

    def obs(self) -> dict:
        return {k: np.stack([o[k] for o in self.window]) for k in self.keys}

    def step(self, chunk: np.ndarray) -> tuple[dict, float, bool, bool, int]:
        total, t0 = 0.0, self.t
        if not self.done:
            for a in chunk:
                obs, r, terminated, truncated, info = self.env.step(a)
                self.t += 1
                total += float(r)
                self.window.append({k: obs[k] for k in self.keys})
                self.success = self.success or bool(info.get("success", False))
                self.done = bool(terminated or truncated or self.t >= self.max_steps)
                if self.rec is not None:  # obs[i] is what action[i] was chosen from
                    self.rec["action"].append(a)
                    self.rec["reward"].append(float(r))
                    if self.done:
                        self._finish()
                    else:
                        self.rec["obs"].append(obs)
                if self.done:
                    break
        return self.obs(), total, self.done, self.success, self.t - t0


def _worker(conn, task, env_kwargs, keys, to, max_steps, n, record=False) -> None:
    try:
        from vlaflow.sim.tasks import make_env

        envs = [make_env(task, **env_kwargs) for _ in range(n)]
        spec = envs[0].task_spec
        slots = [_Slot(e, keys, to, max_steps or spec.max_steps, record) for e in envs]
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        conn.send(("ready", {"extra": dict(spec.extra), "max_steps": spec.max_steps}))
    except BaseException as e:
        conn.send(("fatal", _short_tb(e)))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        kind, payload = msg
        try:
            if kind == "reset":
                conn.send(("ok", [s.reset(*job) for s, job in zip(slots, payload, strict=True)]))
            elif kind == "take":
                taken = [ep for s in slots for ep in s.finished]
                for s in slots:
                    s.finished = []
                conn.send(("ok", taken))
            else:
                conn.send(("ok", [s.step(c) for s, c in zip(slots, payload, strict=True)]))
        except Exception as e:
            conn.send(("error", _short_tb(e)))
    for s in slots:
        s.env.close()


class SubprocChunkEnv:
    """N envs of ``task`` in ``workers`` processes (see the module doc); ``close()`` or ``with`` ends them."""

    def __init__(
        self,
        task: str,
        n_envs: int,
        obs_keys: Sequence[str],
        n_obs_steps: int,
        *,
        workers: int = 1,
        max_steps: int = 0,
        env_kwargs: dict | None = None,
        start_method: str = "spawn",
        record: bool = False,
    ):
        check_reward_task(task)
        if n_envs < 1 or workers < 1:
            raise VlaflowError(f"need n_envs >= 1 and workers >= 1, got {n_envs}, {workers}")
        workers = min(workers, n_envs)
        self.n_envs, self.task, self.record = n_envs, task, record
        self.keys = tuple(obs_keys)
        ctx = mp.get_context(start_method)
        sizes = [n_envs // workers + (i < n_envs % workers) for i in range(workers)]
        self._procs, self._conns, self._sizes = [], [], sizes
        env_kwargs = dict(env_kwargs or {})
        with _environ(WORKER_THREAD_ENV):
            for n in sizes:
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker,
                    args=(child, task, env_kwargs, self.keys, n_obs_steps, max_steps, n, record),
                    daemon=True,
                )
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
        infos = [self._recv(c) for c in self._conns]
        extra = infos[0]["extra"]
        if "reward" not in extra or "success" not in extra:
            self.close()
            raise VlaflowError(f"task {task!r} declares no reward/success in its task_spec.extra: {extra}")
        self.max_steps = max_steps or infos[0]["max_steps"]  # 0: the task's own step limit
        self.env_steps = 0  # real env steps executed so far (all envs)

    def _recv(self, conn):
        if not conn.poll(120):
            self.close()
            raise VlaflowError(f"a {self.task} rollout worker did not answer within 120 s")
        kind, payload = conn.recv()
        if kind in ("fatal", "error"):
            self.close()
            raise VlaflowError(f"{self.task} rollout worker failed:\n{payload}")
        return payload

    def _scatter(self, kind: str, items) -> list:
        i = 0
        for c, n in zip(self._conns, self._sizes, strict=True):
            c.send((kind, items[i : i + n]))
            i += n
        return [r for c in self._conns for r in self._recv(c)]

    def _stack(self, windows: list[dict]) -> dict[str, np.ndarray]:
        return {k: np.stack([w[k] for w in windows]).astype(np.float32) for k in self.keys}

    def reset(self, seeds: Sequence[int], states: Sequence | None = None) -> dict[str, np.ndarray]:
        """Start N episodes with ``seeds``; ``states`` (N task states, optional) sets each env's initial
        state instead (the task's ``reset_to_state`` option: PushT's agent x, y, block x, y, angle)."""
        if len(seeds) != self.n_envs or (states is not None and len(states) != self.n_envs):
            raise VlaflowError(f"reset needs {self.n_envs} seeds (and states), got {len(seeds)}")
        jobs = list(zip(seeds, states if states is not None else [None] * self.n_envs, strict=True))
        return self._stack(self._scatter("reset", jobs))

    def step(self, chunks: np.ndarray):
        chunks = np.asarray(chunks, dtype=np.float64)
        res = self._scatter("step", list(chunks))
        obs = self._stack([r[0] for r in res])
        reward = np.array([r[1] for r in res], np.float64)
        done = np.array([r[2] for r in res], bool)
        success = np.array([r[3] for r in res], bool)
        self.env_steps += sum(r[4] for r in res)
        return obs, reward, done, success

    def take_episodes(self) -> list[dict]:
        """The recorded episodes that ended since the last call (``record=True``), in env order: each
        {"seed", "obs": {key: (T, ...)}, "action": (T, Da) float32, "reward": (T,) float32, "success"}."""
        if not self.record:
            raise VlaflowError("take_episodes needs SubprocChunkEnv(..., record=True)")
        for c in self._conns:
            c.send(("take", None))
        return [ep for c in self._conns for ep in self._recv(c)]

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._conns, self._procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
