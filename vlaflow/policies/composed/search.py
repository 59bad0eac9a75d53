"""GPC weight search, without the simulator: candidate grids, the search over a scoring callable, the table.

The caller owns the rollouts. ``score(weights) -> {"mean_score", "success_rate", "n_episodes", "n_errors"}``
evaluates one candidate (``vlaflow compose`` wires :func:`vlaflow.sim.evaluate.evaluate` in, see
:mod:`vlaflow.cli.compose`; a test can pass a closed form), so this module never imports ``sim`` and stays
torch-free.

Weights: with two parents a candidate is ``(w, 1 - w)`` for each listed ``w``; with three or more, every
point of the simplex on a grid of step ``step``. A vertex (one weight = 1) is a parent by itself, so only a
true mix can "beat every parent".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from vlaflow.errors import ConfigError

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))

Weights = tuple[float, ...]
ScoreFn = Callable[[Weights], dict[str, Any]]


def weight_grid(n_parents: int, weights: list[float] | None, step: float) -> list[Weights]:
    """Candidate convex weight vectors."""
    if n_parents == 2:
        ws = weights if weights is not None else list(DEFAULT_GRID)
        bad = [w for w in ws if not 0 <= w <= 1]
        if bad:
            raise ConfigError(f"--weights must lie in [0, 1], got {bad}")
        return [(float(w), round(1.0 - float(w), 10)) for w in ws]
    if weights is not None:
        raise ConfigError("--weights lists w of the first of two parents; with 3+ parents use --grid-step")
    k = round(1 / step)
    if abs(k * step - 1) > 1e-9:
        raise ConfigError(f"--grid-step must divide 1, got {step}")
    return [
        tuple(c / k for c in combo)
        for combo in itertools.product(range(k + 1), repeat=n_parents)
        if sum(combo) == k
    ]


def search_weights(
    grid: Sequence[Weights], score: ScoreFn, on_row: Callable[[dict], None] | None = None
) -> list[dict]:
    """One row ``{"weights": [...], **score(w)}`` per candidate, in grid order; ``on_row`` sees each as it
    lands (progress output)."""
    rows = []
    for w in grid:
        result = score(w)
        if "mean_score" not in result:
            raise ConfigError(
                f"score({list(w)}) must return a dict with 'mean_score', got keys {sorted(result)}"
            )
        row = {"weights": list(w), **result}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def gpc_table(
    rows: list[dict],
    *,
    parents: list[str],
    parent_names: list[str],
    task: str,
    episodes: int,
    first_seed: int,
) -> dict:
    """``table.json``: the rows, the best one (highest mean score; the first on ties) and whether it is a
    true mix that beats every parent's own score."""
    if not rows:
        raise ConfigError("no candidate weights were scored")
    best = max(rows, key=lambda r: r["mean_score"])
    vertices = [r for r in rows if max(r["weights"]) == 1.0]
    return {
        "parents": parents,
        "parent_names": parent_names,
        "task": task,
        "episodes_per_weight": episodes,
        "seeds": [first_seed, first_seed + episodes - 1],
        "rows": rows,
        "best": best,
        "best_beats_every_parent": bool(vertices)
        and max(best["weights"]) < 1.0
        and all(best["mean_score"] > v["mean_score"] for v in vertices),
    }


def table_markdown(table: dict) -> str:
    """``table.md``: the same table for a person."""
    lo, hi = table["seeds"]
    best = table["best"]
    md = [
        f"# GPC on {table['task']}: {' + '.join(table['parent_names'])}",
        "",
        f"{table['episodes_per_weight']} episodes per weight, seeds {lo}..{hi}",
        "",
        "| weights | mean score | success |",
        "|---|---|---|",
    ]
    md += [f"| {r['weights']} | {r['mean_score']:.3f} | {r['success_rate']:.2f} |" for r in table["rows"]]
    md += [
        "",
        f"best: {best['weights']} ({best['mean_score']:.3f}); beats every parent: "
        f"{table['best_beats_every_parent']}",
    ]
    return "\n".join(md) + "\n"
