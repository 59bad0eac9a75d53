"""The seams every layer meets at, torch-free: what a runtime policy is, what an env is, and their checks.

Timing (the classic off-by-one of this field, drawn once)::

    control step:      t-To+1 ... t-1   t   t+1 ... t+Ta-1 ... t+H-1
    observations:      [----- To -------]                               obs[-1] is the current step t
    action chunk:                       [0] [1] ... [Ta-1]  ...  [H-1]  chunk[0] is the action for step t
    executed:                           [------ Ta ------]               then replan at t+Ta

Training windows use the same alignment: observations t-To+1..t, actions t..t+H-1, both edge-padded at
episode borders (repeat the first/last step) so every step of every episode can start a window.

A *runtime policy* (:class:`RuntimePolicy`) is what evaluation, the real-time executor, the ROS 2 node and
users' scripts drive: ``config`` (a :class:`RuntimeSpec`), ``infer(obs, *, shift=None, delay=None) ->
InferResult`` and ``reset(seed=None)``. Stateful samplers read the keywords (RTI-DP the shift since the
previous chunk, RTC the inference delay); the rest ignore them. An *env* (:class:`Env`) is the gymnasium
API with store-keyed dict observations and a :class:`TaskSpec`: sim tasks, the imagined env of a world
model and a robot behind ROS 2 topics all take this shape.

Nothing here imports torch, so a robot computer with numpy + onnxruntime can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

import vlaflow.keys as K
from vlaflow.errors import VlaflowError


@dataclass(frozen=True)
class RuntimeSpec:
    """What a caller needs to feed a policy and execute its chunks."""

    n_obs_steps: int  # To: observation steps the policy reads (the last To, oldest first)
    horizon: int  # H: actions per predicted chunk; chunk[0] is the action for the current step
    n_action_steps: int  # Ta: actions executed before replanning (Ta <= H)
    obs_shapes: dict[str, tuple[int, ...]]  # store key -> per-step shape, e.g. {"obs.state": (5,)}
    action_dim: int  # Da
    fps: float  # control rate the policy was trained at
    task: str = ""  # default instruction text for language-conditioned policies
    extra: dict = field(default_factory=dict)  # family-specific read-only facts (sampler, nfe, ...)

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return tuple(self.obs_shapes)

    def __post_init__(self):
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(
                f"need 1 <= n_action_steps <= horizon, got {self.n_action_steps}, {self.horizon}"
            )


@dataclass(frozen=True)
class TaskSpec:
    """What a task (a sim env, an imagined env, a robot) declares about itself."""

    name: str  # registry name, e.g. "pusht"
    fps: float  # control rate (env steps per second)
    obs_shapes: dict[str, tuple[int, ...]]  # store key -> per-step shape for the chosen obs mode
    obs_dtypes: dict[str, str]  # store key -> dtype ("float32", "uint8")
    action_dim: int  # Da
    action_low: tuple[float, ...]  # per-dim bounds of a valid action
    action_high: tuple[float, ...]
    max_steps: int  # episode step limit used by evaluation
    instruction: str = ""  # language instruction for the task
    extra: dict = field(default_factory=dict)


@dataclass
class InferResult:
    """One ``infer`` call: the chunk, what it cost, and optional records (e.g. the denoising chain)."""

    actions: np.ndarray  # (H, Da) float32 in the dataset's action units; actions[0] is for the current step
    nfe: int | None = None  # network evaluations spent (None: the runtime does not count them)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. "chain" (recorded denoising steps), "energy"


@runtime_checkable
class RuntimePolicy(Protocol):
    """``infer`` maps the last To observations per key to an :class:`InferResult` with an (H, Da) chunk.

    ``obs`` holds arrays keyed as in the store: ``obs.state`` of shape (To, D), ``obs.image.<cam>`` of
    shape (To, h, w, 3) uint8; a language-conditioned policy also reads ``obs["task"]`` (a str) when given.
    ``shift``: control steps executed since the previous chunk's first action (default Ta); ``delay``:
    the inference delay in control steps (default: the runtime's own estimate). ``reset(seed)`` starts an
    episode and re-seeds the runtime's noise.
    """

    config: RuntimeSpec

    def infer(
        self, obs: dict[str, Any], *, shift: int | None = None, delay: int | None = None
    ) -> InferResult: ...

    def reset(self, seed: int | None = None) -> None: ...


@runtime_checkable
class Env(Protocol):
    """The gymnasium API with observations keyed like the store and the task's :class:`TaskSpec`.

    ``info["success"]`` is the task's success test at every step.
    """

    task_spec: TaskSpec

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]: ...

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]: ...

    def render(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------- checks
def obs_window(spec: RuntimeSpec, obs: dict[str, Any]) -> dict[str, Any]:
    """Check a runtime observation and keep its last To steps per key: {key: (To, *shape)} (+ ``task``).

    A missing key or a wrong per-step shape is an error naming the key, the expected and the found shape.
    """
    try:  # LeRobot's names (observation.state, observation.images.<cam>) stand for ours
        obs = K.resolve_aliases(obs, spec.obs_keys)
    except ValueError as e:
        raise VlaflowError(str(e)) from None
    missing = [k for k in spec.obs_keys if k not in obs]
    if missing:
        raise VlaflowError(
            f"obs is missing key(s) {missing}; the policy needs {list(spec.obs_keys)} (LeRobot's "
            f"observation.* names are accepted too), got {sorted(obs)}"
        )
    out: dict[str, Any] = {}
    for k, shape in spec.obs_shapes.items():
        x = np.asarray(obs[k])
        if x.shape[1:] != tuple(shape) or x.shape[0] < spec.n_obs_steps:
            raise VlaflowError(
                f"obs[{k!r}] has shape {x.shape}, expected ({spec.n_obs_steps}, {', '.join(map(str, shape))})"
            )
        out[k] = np.ascontiguousarray(x[-spec.n_obs_steps :])
    if K.TASK in obs:
        out[K.TASK] = str(obs[K.TASK])
    return out


def check_chunk(chunk, spec: RuntimeSpec) -> np.ndarray:
    """The policy's chunk as float64 (H, Da); a wrong shape or a non-finite value is an error."""
    arr = np.asarray(chunk.detach().cpu().numpy() if hasattr(chunk, "detach") else chunk, dtype=np.float64)
    if arr.shape != (spec.horizon, spec.action_dim):
        raise VlaflowError(
            f"policy returned an action chunk of shape {arr.shape}; its config promises (H, Da) = "
            f"({spec.horizon}, {spec.action_dim})"
        )
    if not np.all(np.isfinite(arr)):
        raise VlaflowError(
            f"policy returned non-finite actions: {arr[~np.isfinite(arr).all(axis=1)][:2].tolist()}"
        )
    return arr


def as_infer_result(out: Any) -> InferResult:
    """A runtime's ``infer`` output as an :class:`InferResult`.

    vlaflow's runtimes return one; a user's own policy may return a bare (H, Da) array, which is accepted
    as the chunk with an unknown NFE.
    """
    if isinstance(out, InferResult):
        return out
    return InferResult(actions=np.asarray(out))


def unflat_obs(s, keys, shapes: dict[str, tuple[int, ...]], to: int) -> dict[str, Any]:
    """Flat obs features (B, Ds) -> windows {key: (B, to, *shapes[key])}, keys concatenated in ``keys``'
    order, each key's ``to`` steps flattened together (the layout of RL's flat observations). Slicing and
    reshaping only: numpy arrays and torch tensors alike."""
    out, i = {}, 0
    for k in keys:
        n = to * int(np.prod(shapes[k], dtype=np.int64))
        out[k] = s[:, i : i + n].reshape(s.shape[0], to, *shapes[k])
        i += n
    return out
