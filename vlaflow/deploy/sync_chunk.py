"""Synchronous action chunking: the simplest executor, for the simulator and for a robot that can wait.

Shapes: To observation steps, H chunk length, Ta actions executed per replan, Da action dim. Timing as
drawn in :mod:`vlaflow.interfaces`: infer on observations t-To+1..t, execute chunk[0:Ta] at steps
t..t+Ta-1, replan at t+Ta. Inference runs inside ``act`` (the caller waits for it); for inference beside
a fixed-rate tick see :mod:`vlaflow.deploy.executor`. Torch-free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from vlaflow.deploy.executor import NfeCount
from vlaflow.interfaces import RuntimeSpec, as_infer_result, check_chunk


class SyncChunkExecutor:
    """Infer on the last To observations, execute chunk[0:Ta], replan.

    The obs window holds steps t-To+1..t (oldest first); at the first step of an episode it is padded by
    repeating the first observation, as training windows are edge-padded. chunk[0] is the action for the
    current step t. ``infer`` is called with the window only (no shift/delay: nothing overlaps here).
    """

    def __init__(self, infer: Callable[[dict], object], spec: RuntimeSpec, task_text: str | None = None):
        self.infer = infer
        self.spec = spec
        self.keys = spec.obs_keys
        self.task_text = task_text
        self.reset()

    def reset(self) -> None:
        self._window: deque = deque(maxlen=self.spec.n_obs_steps)
        self._queue: deque = deque()
        self.n_infer = 0
        self.ticks = 0
        self.nfe = NfeCount()

    def _obs_window(self) -> dict:
        obs = {k: np.stack([o[k] for o in self._window]) for k in self.keys}  # (To, *shape) per key
        if self.task_text is not None:
            obs["task"] = self.task_text
        return obs

    def act(self, obs: dict[str, np.ndarray], t: int) -> np.ndarray:
        """The action for control step ``t`` given the observation at ``t``."""
        obs = {k: obs[k] for k in self.keys}
        if not self._window:
            self._window.extend([obs] * self.spec.n_obs_steps)
        else:
            self._window.append(obs)
        if not self._queue:
            result = as_infer_result(self.infer(self._obs_window()))
            chunk = check_chunk(result.actions, self.spec)  # (H, Da)
            self.nfe.add(result.nfe)
            self.n_infer += 1
            self._queue.extend(chunk[: self.spec.n_action_steps])
        self.ticks += 1
        return self._queue.popleft()

    def stats(self) -> dict:
        """Control steps, inferences and network evaluations so far (JSON-ready)."""
        return {"ticks": self.ticks, "inferences": self.n_infer, **self.nfe.stats()}
