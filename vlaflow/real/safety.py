"""The safety layer, last in the chain between the executor and the robot; usable (and tested) alone.

Shapes: H chunk length, Da action dim; ``dt`` the control period (s). Units are the action's (radians,
metres, or a normalized motion per tick), limits per second as in the robot contract.

- :meth:`SafetyLayer.validate_chunk` runs before a landed chunk is accepted and rejects it with a reason
  code (:data:`REJECT_REASONS`): a non-finite value; a position dim outside its limits minus the margin; a
  per-step velocity or acceleration beyond the limits (including the step from the last command into the
  chunk); the first executed action too far from the measured state.
- :meth:`SafetyLayer.clamp` runs on every emitted action: position dims into their limits, step (velocity)
  and velocity change (acceleration) bounded, delta and gripper dims into their range, delta motions that
  would leave the workspace box shortened. Each intervention is counted by kind.
- :meth:`SafetyLayer.hold` is what the node emits instead of a policy action when a watchdog fires (stale
  observation, inference late / schedule empty, heartbeat lost): motion is brought to rest within
  ``hold_decel_s`` (position dims keep moving with a velocity decaying to zero, delta dims decay to zero,
  grippers keep their last command); a stale scheduled action is never replayed.
- :class:`EStop` latches: once tripped, every output from the next tick on is gated, until the process
  restarts (a latched e-stop is not cleared by a message).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from vlaflow.real.contract import ActionSpec, SafetySpec

REJECT_REASONS = ("shape", "non_finite", "position_limit", "velocity", "acceleration", "first_action_far")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # one of REJECT_REASONS when not ok
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


OK = Verdict(True)


class SafetyLayer:
    """Validation, per-tick clamp and hold for one robot's action space (see the module doc).

    Stateful: it remembers the last command it let through and its velocity (``commit``), which the
    step / acceleration clamps and the hold need. ``reset(command)`` starts from a known command (the
    measured state at engage).
    """

    def __init__(self, action: ActionSpec, safety: SafetySpec, dt: float):
        self.action, self.safety, self.dt = action, safety, float(dt)
        n = action.dim
        self.kinds = np.array(action.kinds)
        self.pos = self.kinds == "position"
        self.delta = self.kinds == "delta"
        self.grip = self.kinds == "gripper"
        self.low = np.asarray(action.low, dtype=np.float64)
        self.high = np.asarray(action.high, dtype=np.float64)
        m = safety.position_margin
        self.safe_low = np.where(self.pos, self.low + m, self.low)
        self.safe_high = np.where(self.pos, self.high - m, self.high)
        self.vmax = (
            np.full(n, np.inf) if action.max_velocity is None else np.asarray(action.max_velocity, float)
        )
        self.amax = (
            np.full(n, np.inf)
            if action.max_acceleration is None
            else np.asarray(action.max_acceleration, float)
        )
        self.last: np.ndarray | None = None  # the last command let through
        self.velocity = np.zeros(n)  # its per-second rate of change (position dims)
        self.interventions: dict[str, int] = {}
        self._hold_rate: np.ndarray | None = None  # deceleration of the current hold, per dim

    # ------------------------------------------------------------------------------------------ state
    def reset(self, command: np.ndarray | None) -> None:
        self.last = None if command is None else np.asarray(command, dtype=np.float64).copy()
        self.velocity = np.zeros(self.action.dim)
        self._hold_rate = None

    def commit(self, command: np.ndarray) -> None:
        command = np.asarray(command, dtype=np.float64)
        if self.last is not None:
            self.velocity = np.where(self.pos, (command - self.last) / self.dt, 0.0)
        self.last = command.copy()

    def snapshot(self) -> tuple:
        """The state the next clamp / hold depend on (previews restore it, committing nothing)."""
        last = None if self.last is None else self.last.copy()
        return last, self.velocity.copy(), self._hold_rate, dict(self.interventions)

    def restore(self, state: tuple) -> None:
        self.last, self.velocity, self._hold_rate, self.interventions = state

    def count(self, kind: str, n: int = 1) -> None:
        self.interventions[kind] = self.interventions.get(kind, 0) + n

    # ------------------------------------------------------------------------------------------ chunks
    def validate_chunk(
        self, chunk: np.ndarray, first: int = 0, measured: np.ndarray | None = None, continuous: bool = True
    ) -> Verdict:
        """Accept or reject a landed chunk whose rows from ``first`` on will be executed.

        ``measured``: the measured value of each dim (NaN where there is none), for the first-action
        check of position dims. Velocity and acceleration are checked over the executed rows, starting
        from the last command let through (so the jump into the chunk counts) unless ``continuous`` is
        False (a primed chunk, which the engage ramp joins to the measured state).
        """
        c = np.asarray(chunk, dtype=np.float64)
        n = self.action.dim
        if c.ndim != 2 or c.shape[1] != n or c.shape[0] == 0:
            return self._reject("shape", f"expected (H, {n}), got {c.shape}")
        if not np.isfinite(c).all():
            i, j = np.argwhere(~np.isfinite(c))[0]
            return self._reject("non_finite", f"chunk[{i}, {j}] ({self.action.names[j]}) = {c[i, j]}")
        rows = c[first:] if first < len(c) else c[-1:]
        out = (rows < self.safe_low) | (rows > self.safe_high)
        out &= self.pos
        if out.any():
            i, j = np.argwhere(out)[0]
            return self._reject(
                "position_limit",
                f"{self.action.names[j]} = {rows[i, j]:.4g} at row {first + i}, limits "
                f"[{self.safe_low[j]:.4g}, {self.safe_high[j]:.4g}] (margin {self.safety.position_margin})",
            )
        if measured is not None and self.safety.max_first_action_distance is not None:
            m = np.asarray(measured, dtype=np.float64)
            d = np.where(self.pos & np.isfinite(m), np.abs(rows[0] - m), 0.0)
            if d.max() > self.safety.max_first_action_distance:
                j = int(np.argmax(d))
                return self._reject(
                    "first_action_far",
                    f"{self.action.names[j]}: first action {rows[0, j]:.4g}, measured {m[j]:.4g} "
                    f"(|diff| {d[j]:.4g} > {self.safety.max_first_action_distance})",
                )
        joined = continuous and self.last is not None
        path = np.concatenate([self.last[None], rows]) if joined else rows
        if len(path) >= 2:
            v = np.diff(path, axis=0) / self.dt  # (n-1, Da)
            over = (np.abs(v) > self.vmax * (1 + 1e-9)) & self.pos
            if over.any():
                i, j = np.argwhere(over)[0]
                return self._reject(
                    "velocity",
                    f"{self.action.names[j]}: {abs(v[i, j]):.4g}/s at step {i} > max_velocity "
                    f"{self.vmax[j]:.4g}",
                )
            v0 = self.velocity[None] if joined else v[:1]
            a = np.diff(np.concatenate([v0, v]), axis=0) / self.dt
            over = (np.abs(a) > self.amax * (1 + 1e-9)) & self.pos
            if over.any():
                i, j = np.argwhere(over)[0]
                return self._reject(
                    "acceleration",
                    f"{self.action.names[j]}: {abs(a[i, j]):.4g}/s^2 at step {i} > max_acceleration "
                    f"{self.amax[j]:.4g}",
                )
        return OK

    def _reject(self, reason: str, detail: str) -> Verdict:
        self.count(f"reject_{reason}")
        return Verdict(False, reason, detail)

    # ------------------------------------------------------------------------------------------ per tick
    def clamp(self, action: np.ndarray, ws_position: np.ndarray | None = None) -> np.ndarray:
        """The action made safe for this tick (see the module doc); ``commit`` is the caller's."""
        a = np.asarray(action, dtype=np.float64).copy()
        if not np.isfinite(a).all():  # never reaches the arm: hold instead
            self.count("clamp_non_finite")
            return self.hold()
        self._hold_rate = None
        clipped = np.clip(a, self.safe_low, self.safe_high)
        if (clipped != a).any():
            self.count("clamp_position" if (self.pos & (clipped != a)).any() else "clamp_range")
        a = clipped
        if self.last is not None and self.pos.any():
            step = self.vmax * self.dt
            lo = np.maximum(self.last - step, self.last + (self.velocity - self.amax * self.dt) * self.dt)
            hi = np.minimum(self.last + step, self.last + (self.velocity + self.amax * self.dt) * self.dt)
            lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
            b = np.where(self.pos, np.clip(a, lo, hi), a)
            if (b != a).any():
                self.count("clamp_step")
            a = np.clip(b, self.safe_low, self.safe_high)
        if self.last is not None and self.delta.any() and np.isfinite(self.amax[self.delta]).any():
            change = self.amax * self.dt  # delta dims: bounded change of the motion per tick
            b = np.where(self.delta, np.clip(a, self.last - change, self.last + change), a)
            if (b != a).any():
                self.count("clamp_delta_change")
            a = b
        ws = self.safety.workspace
        if ws is not None and ws_position is not None and np.isfinite(ws_position).all():
            dims = list(ws.delta_dims)
            target = ws_position + a[dims] * ws.delta_scale
            inside = np.clip(target, ws.low, ws.high)
            if (inside != target).any():
                a[dims] = (inside - ws_position) / ws.delta_scale
                self.count("clamp_workspace")
        return a

    def hold(self) -> np.ndarray:
        """The next command of a hold: motion decays to rest within ``hold_decel_s`` (see the module doc)."""
        if self.last is None:
            raise RuntimeError("SafetyLayer.hold before any command (reset it with the measured state)")
        dt, T = self.dt, max(self.safety.hold_decel_s, self.dt)
        rate_now = np.where(self.pos, self.velocity, np.where(self.delta, self.last, 0.0))
        if self._hold_rate is None:  # start of a hold: decelerate each dim at a constant rate
            self._hold_rate = np.minimum(np.abs(rate_now) / T, np.where(self.pos, self.amax, np.inf))
            self._hold_rate = np.where(np.isfinite(self._hold_rate), self._hold_rate, np.abs(rate_now) / T)
        step = self._hold_rate * dt
        slowed = np.sign(rate_now) * np.maximum(np.abs(rate_now) - step, 0.0)
        out = self.last.copy()
        out[self.pos] = np.clip(self.last + slowed * dt, self.safe_low, self.safe_high)[self.pos]
        out[self.delta] = slowed[self.delta]
        return out


class EStop:
    """A latched emergency stop: ``trip`` from any thread; ``tripped`` stays True until the process ends."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""
        self.tripped_at_ns: int | None = None

    def trip(self, reason: str, t_ns: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.tripped_at_ns = reason, t_ns
            self._event.set()

    @property
    def tripped(self) -> bool:
        return self._event.is_set()
