"""The executor's schedule (actions keyed by absolute control step) and its smoothness statistics.

Shapes: H chunk length, Da action dim. Pure numpy, torch-free: the robot computer imports it.

Jerk statistics (action units / step^3), over the emitted actions a[0..n-1] and the indices b at which a
landed chunk first drives the output (its *boundaries*):

- boundary jerk: mean over boundaries b of the largest ||a[j] - 3 a[j-1] + 3 a[j-2] - a[j-3]|| whose
  stencil spans the step b-1 -> b (j = b, b+1, b+2);
- interior jerk: the same at the midpoint between consecutive boundaries (the policy's own jerk, a floor
  for the boundary value);
- mean jerk: the mean third difference over the whole stream.

:func:`boundary_jerk` / :func:`interior_jerk` / :func:`mean_jerk` define them on a whole history;
:class:`JerkMeter` computes the same numbers on a stream in bounded memory, so a robot node running for
hours does not keep every command it ever sent.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ChunkSchedule:
    """Actions keyed by absolute control step; chunks merge in by replacement or temporal ensembling."""

    def __init__(self, ensemble: bool, decay: float = 0.01):
        self.ensemble = ensemble
        self.decay = decay
        self._entries: dict[int, list[tuple[int, np.ndarray]]] = {}  # step -> [(chunk id, action (Da,))]
        self._next_id = 0

    def peek(self, step: int) -> np.ndarray | None:
        items = self._entries.get(step)
        if not items:
            return None
        if not self.ensemble or len(items) == 1:
            return items[-1][1]
        ids = np.array([cid for cid, _ in items], dtype=np.float64)
        w = np.exp(-self.decay * (ids - ids.min()))  # the oldest chunk weighs most (ACT)
        return np.tensordot(w / w.sum(), np.stack([a for _, a in items]), axes=1)

    def merge(self, chunk: np.ndarray, start_step: int, now_step: int) -> int:
        """Merge ``chunk`` (H, Da) whose entry i is for step start_step + i; returns stale entries dropped."""
        cid = self._next_id
        self._next_id += 1
        stale = 0
        for i, a in enumerate(chunk):
            step = start_step + i
            if step < now_step:  # its time has passed: never executed
                stale += 1
                continue
            if self.ensemble:
                self._entries.setdefault(step, []).append((cid, np.asarray(a, dtype=np.float64)))
            else:
                self._entries[step] = [(cid, np.asarray(a, dtype=np.float64))]
        return stale

    def take(self, step: int) -> np.ndarray | None:
        """The action for ``step``, forgetting every entry at or before it (nothing is replayed)."""
        action = self.peek(step)
        for k in [k for k in self._entries if k <= step]:
            del self._entries[k]
        return action

    def last_step(self) -> int | None:
        return max(self._entries) if self._entries else None


# ---------------------------------------------------------------------------------------------- jerk
def boundary_jerk(actions: np.ndarray, boundaries: list[int]) -> float:
    """Mean over boundaries b of the largest ||third difference|| whose stencil spans steps b-1 -> b."""
    a = np.asarray(actions, dtype=np.float64)
    vals = []
    for b in boundaries:
        js = [j for j in (b, b + 1, b + 2) if j - 3 >= 0 and j < len(a)]
        if js:
            vals.append(max(float(np.linalg.norm(a[j] - 3 * a[j - 1] + 3 * a[j - 2] - a[j - 3])) for j in js))
    return float(np.mean(vals)) if vals else 0.0


def interior_jerk(actions: np.ndarray, boundaries: list[int]) -> float:
    """The same statistic as :func:`boundary_jerk` at the midpoint between consecutive boundaries.

    A reference for how jerky the policy's own chunks are: a perfectly continued chunk cannot bring the
    boundary statistic below it (both take the largest of three stencils), so ``boundary - interior``
    is the part of the boundary jerk that the chunk switch itself adds.
    """
    mids = [(a + b) // 2 for a, b in zip(boundaries, boundaries[1:], strict=False) if b - a >= 4]
    return boundary_jerk(actions, mids)


def mean_jerk(actions: np.ndarray) -> float:
    a = np.asarray(actions, dtype=np.float64)
    if len(a) < 4:
        return 0.0
    d3 = a[3:] - 3 * a[2:-1] + 3 * a[1:-2] - a[:-3]
    return float(np.linalg.norm(d3, axis=-1).mean())


class _Points:
    """Stencil points p whose statistic is max ||d3(j)|| over j in (p, p+1, p+2), j >= 3, j < n."""

    def __init__(self):
        self.open: list[list] = []  # [p, running max or None], p + 2 >= n (more stencils may come)
        self.total, self.count = 0.0, 0  # closed points that had at least one stencil

    def add(self, p: int, d3: dict[int, float], n: int) -> None:
        """Register p, taking the stencils already computed (``d3``: index -> norm) into account."""
        known = [d3[j] for j in (p, p + 1, p + 2) if j in d3]
        point = [p, max(known) if known else None]
        if p + 2 < n:
            self._close(point)
        else:
            self.open.append(point)

    def feed(self, j: int, norm: float | None, n: int) -> None:
        """The stencil at index j (None when j < 3) is known; n actions have been fed."""
        still = []
        for point in self.open:
            p, m = point
            if norm is not None and p <= j <= p + 2:
                point[1] = norm if m is None else max(m, norm)
            if p + 2 < n:
                self._close(point)
            else:
                still.append(point)
        self.open = still

    def _close(self, point: list) -> None:
        if point[1] is not None:
            self.total += point[1]
            self.count += 1

    def mean(self) -> float:
        vals = [m for _, m in self.open if m is not None]
        count = self.count + len(vals)
        return (self.total + sum(vals)) / count if count else 0.0


class JerkMeter:
    """:func:`boundary_jerk`, :func:`interior_jerk` and :func:`mean_jerk` of a stream, in bounded memory.

    ``add(a)`` per emitted action, ``mark_boundary()`` when a landed chunk will drive the next action.
    The values equal the whole-history functions (up to float summation order). Memory: the last four
    actions plus the third differences since the last boundary (an interior point lies between two
    boundaries), so it grows only while no chunk lands (an inference stall, itself an alarm).
    """

    def __init__(self):
        self.n = 0  # actions fed
        self._tail: deque = deque(maxlen=4)  # the last four actions, (Da,) each
        self._since: dict[int, float] = {}  # index -> ||d3|| for indices >= the last boundary
        self._last_boundary: int | None = None
        self._boundary, self._interior = _Points(), _Points()
        self._d3_total, self._d3_count = 0.0, 0

    def add(self, action: np.ndarray) -> None:
        self._tail.append(np.asarray(action, dtype=np.float64))
        j, self.n = self.n, self.n + 1
        norm = None
        if j >= 3:
            a = self._tail
            norm = float(np.linalg.norm(a[3] - 3 * a[2] + 3 * a[1] - a[0]))
            self._d3_total += norm
            self._d3_count += 1
            self._since[j] = norm
        self._boundary.feed(j, norm, self.n)
        self._interior.feed(j, norm, self.n)

    def mark_boundary(self) -> None:
        """The next action added is the first one a newly landed chunk drives."""
        b = self.n
        a = self._last_boundary
        if a is not None and b - a >= 4:
            self._interior.add((a + b) // 2, self._since, self.n)
        self._boundary.add(b, {}, self.n)
        self._last_boundary = b
        self._since = {}  # the next midpoint lies at or after b

    @property
    def boundary(self) -> float:
        return self._boundary.mean()

    @property
    def interior(self) -> float:
        return self._interior.mean()

    @property
    def mean(self) -> float:
        return self._d3_total / self._d3_count if self._d3_count else 0.0
