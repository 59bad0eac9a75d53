"""Rewards of imagined states: the task's own (PushT coverage from the predicted state, no simulator) and
a learned success classifier (World4RL's reward).

Shapes: N states, Do state dim.

PushT (gym-pusht 0.1.8): the T block is two boxes in the body frame, ``[-60, 60] x [0, 30]`` and
``[-15, 15] x [30, 120]``; a body-frame vertex ``v`` sits at ``p + R(angle) v`` with ``p`` the state's block
position (checked against pymunk's ``local_to_world``: the centre-of-gravity offset gym-pusht sets does not
enter), and the goal T is the same boxes at pose ``(256, 256, pi/4)``. Coverage = area(block T and goal T
intersected) / area(goal T); the boxes of one T do not overlap, so the intersection is the sum over the four
box pairs of convex-polygon intersections (Sutherland-Hodgman). Reward = clip(coverage / 0.95, 0, 1),
success = coverage > 0.95, as the sim's. tests/test_world_models.py checks it against gym-pusht's own
shapely computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from vlaflow.errors import VlaflowError

RewardFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (N, Do) states -> reward, success (N,)

PUSHT_GOAL = (256.0, 256.0, math.pi / 4)
PUSHT_SUCCESS_COVERAGE = 0.95
_BOXES = (
    np.array([[-60.0, 30.0], [60.0, 30.0], [60.0, 0.0], [-60.0, 0.0]]),
    np.array([[-15.0, 30.0], [-15.0, 120.0], [15.0, 120.0], [15.0, 30.0]]),
)
_COG = np.zeros(2)
_T_AREA = 120.0 * 30.0 + 30.0 * 90.0


def _place(box: np.ndarray, x: float, y: float, angle: float, cog: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (box - cog) @ rot.T + np.array([x, y])


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _ccw(poly: np.ndarray) -> np.ndarray:
    x, y = poly[:, 0], poly[:, 1]
    signed = float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return poly if signed > 0 else poly[::-1]


def _clip(subject: np.ndarray, clipper: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of convex ``subject`` inside convex counter-clockwise ``clipper``."""
    out = subject
    for i in range(len(clipper)):
        if len(out) == 0:
            break
        a, b = clipper[i], clipper[(i + 1) % len(clipper)]
        edge = b - a
        side = edge[0] * (out[:, 1] - a[1]) - edge[1] * (out[:, 0] - a[0])  # >= 0: inside (left of edge)
        new = []
        for j in range(len(out)):
            p, q, sp, sq = out[j], out[(j + 1) % len(out)], side[j], side[(j + 1) % len(out)]
            if sp >= 0:
                new.append(p)
            if (sp >= 0) != (sq >= 0):
                new.append(p + (q - p) * (sp / (sp - sq)))
        out = np.array(new) if new else np.zeros((0, 2))
    return out


_GOAL_BOXES = tuple(_ccw(_place(b, *PUSHT_GOAL, np.zeros(2))) for b in _BOXES)


def pusht_coverage(states: np.ndarray) -> np.ndarray:
    """(N, 5) PushT states (agent x, y, block x, y, angle) -> (N,) coverage of the goal by the block."""
    states = np.asarray(states, np.float64).reshape(-1, 5)
    out = np.zeros(len(states))
    for n, (_, _, bx, by, ang) in enumerate(states):
        if not np.isfinite([bx, by, ang]).all():
            out[n] = np.nan
            continue
        inter = 0.0
        for box in _BOXES:
            placed = _ccw(_place(box, bx, by, ang, _COG))
            for goal in _GOAL_BOXES:
                inter += _area(_clip(placed, goal))
        out[n] = inter / _T_AREA
    return out


def pusht_reward(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5) -> reward clip(coverage / 0.95, 0, 1) (N,) and success coverage > 0.95 (N,), like the sim."""
    cov = pusht_coverage(states)
    return np.clip(cov / PUSHT_SUCCESS_COVERAGE, 0.0, 1.0), cov > PUSHT_SUCCESS_COVERAGE


# the task's own reward computed from a predicted state (the imagined env's reward "coverage")
TASK_REWARDS: dict[str, RewardFn] = {"pusht": pusht_reward}


def task_reward(task: str) -> RewardFn:
    """The task's own reward from predicted states; a task without one says which tasks have one."""
    if task not in TASK_REWARDS:
        raise VlaflowError(
            f"no reward from predicted states is defined for task {task!r} (defined for: "
            f"{', '.join(TASK_REWARDS)}); use a success classifier (reward 'classifier') instead"
        )
    return TASK_REWARDS[task]


class SuccessClassifier(nn.Module):
    """p(success | state): an MLP on mean/std-normalized states (World4RL's learned reward)."""

    def __init__(self, obs_dim: int, mean: np.ndarray, std: np.ndarray, width: int = 128):
        super().__init__()
        self.obs_dim, self.width = obs_dim, width
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(obs_dim, width), nn.Mish(), nn.Linear(width, width), nn.Mish(), nn.Linear(width, 1)
        )

    def forward(self, states: Tensor) -> Tensor:
        """(N, Do) raw states -> (N,) success logits."""
        return self.net((states - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def reward(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, Do) -> reward = p(success) (N,), success = p > 0.5 (N,)."""
        p = torch.sigmoid(self(torch.as_tensor(np.asarray(states), dtype=torch.float32))).numpy()
        return p.astype(np.float64), p > 0.5


def train_success_classifier(
    states: np.ndarray, labels: np.ndarray, *, steps: int = 500, lr: float = 1e-3, seed: int = 0
) -> SuccessClassifier:
    """Logistic loss on (N, Do) states labelled success (1) / not (0), classes balanced by weighting."""
    torch.manual_seed(seed)
    x = torch.as_tensor(states, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    clf = SuccessClassifier(x.shape[1], x.mean(0).numpy(), x.std(0).numpy())
    pos = float(y.mean().clamp(1e-3, 1 - 1e-3))
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), min(512, len(x))))
        loss = nn.functional.binary_cross_entropy_with_logits(
            clf(x[idx]), y[idx], pos_weight=torch.tensor((1 - pos) / pos)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties counted half."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks[order] = first[inv] + (counts[inv] + 1) / 2
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
