"""Joint-trajectory following with ros2_control's replacement semantics (the simulated arm's controller).

A new ``trajectory_msgs/JointTrajectory`` replaces the part of the current trajectory after *now*: its
points are placed at ``header.stamp + time_from_start`` (a zero stamp means "now"), points already in the
past are dropped, and the arm moves from where it is commanded to be at this instant to the first future
point. Between knots positions follow a cubic Hermite spline through the points' velocities (linear when
a message carries none); after the last point the arm holds it. Joints not named keep their targets.
"""

from __future__ import annotations

import numpy as np

from vlaflow.real.msgs import NS, Rejected, stamp_ns


class TrajectoryFollower:
    """Targets of ``joint_names`` over time; :meth:`replace` with each message, :meth:`sample` each step."""

    def __init__(
        self, joint_names: list[str] | tuple[str, ...], start: np.ndarray, topic: str = "/trajectory"
    ):
        self.names = list(joint_names)
        self.topic = topic
        self.times = np.zeros(1, dtype=np.int64)  # knot times (ns)
        self.pos = np.asarray(start, dtype=np.float64)[None].copy()  # (K, J)
        self.vel = np.zeros_like(self.pos)
        self.dropped_points = 0  # points that arrived with their time already past

    def replace(self, msg, now_ns: int) -> None:
        """Apply a JointTrajectory received at ``now_ns``; raises :class:`Rejected` for a malformed one."""
        names = list(msg.joint_names)
        unknown = [n for n in names if n not in self.names]
        if unknown or not names:
            raise Rejected(self.topic, "joint_names", f"a subset of {self.names}", f"{names}")
        idx = [self.names.index(n) for n in names]
        t0 = stamp_ns(msg) or now_ns
        current_p, current_v = self.sample(now_ns), self._velocity(now_ns)
        times, pos, vel = [now_ns], [current_p], [current_v]
        for i, p in enumerate(msg.points):
            q = np.asarray(p.positions, dtype=np.float64)
            if q.shape != (len(names),) or not np.isfinite(q).all():
                raise Rejected(
                    self.topic, f"points[{i}].positions", f"{len(names)} finite values", f"{q.tolist()}"
                )
            t = t0 + int(p.time_from_start.sec) * NS + int(p.time_from_start.nanosec)
            if t <= now_ns:
                self.dropped_points += 1
                continue
            if t <= times[-1]:
                raise Rejected(
                    self.topic, f"points[{i}].time_from_start", "increasing times", f"{t} <= {times[-1]}"
                )
            full = pos[-1].copy()
            full[idx] = q
            v = np.asarray(p.velocities, dtype=np.float64)
            fv = np.full(len(self.names), np.nan)
            if v.shape == (len(names),) and np.isfinite(v).all():
                fv[idx] = v
            times.append(t)
            pos.append(full)
            vel.append(fv)
        self.times = np.asarray(times, dtype=np.int64)
        self.pos = np.stack(pos)
        self.vel = np.stack(vel)

    def _segment(self, t_ns: int):
        k = int(np.searchsorted(self.times, t_ns, side="right")) - 1
        return k

    def sample(self, t_ns: int) -> np.ndarray:
        k = self._segment(t_ns)
        if k < 0:
            return self.pos[0].copy()
        if k >= len(self.times) - 1:
            return self.pos[-1].copy()
        return self._hermite(k, t_ns)[0]

    def _velocity(self, t_ns: int) -> np.ndarray:
        k = self._segment(t_ns)
        if k < 0 or k >= len(self.times) - 1:
            return np.zeros(len(self.names))
        return self._hermite(k, t_ns)[1]

    def _hermite(self, k: int, t_ns: int) -> tuple[np.ndarray, np.ndarray]:
        t0, t1 = self.times[k], self.times[k + 1]
        h = (t1 - t0) / NS
        s = (t_ns - t0) / (t1 - t0)
        p0, p1 = self.pos[k], self.pos[k + 1]
        slope = (p1 - p0) / h
        m0 = np.where(np.isfinite(self.vel[k]), self.vel[k], slope)
        m1 = np.where(np.isfinite(self.vel[k + 1]), self.vel[k + 1], slope)
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        p = h00 * p0 + h10 * h * m0 + h01 * p1 + h11 * h * m1
        d00, d10, d01, d11 = 6 * s**2 - 6 * s, 3 * s**2 - 4 * s + 1, -6 * s**2 + 6 * s, 3 * s**2 - 2 * s
        v = (d00 * p0 + d01 * p1) / h + d10 * m0 + d11 * m1
        return p, v

    @property
    def end_ns(self) -> int:
        return int(self.times[-1])
