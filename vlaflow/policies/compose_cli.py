"""``vlaflow compose``: GPC weight search by rollouts; table + plot of score vs weight; best as checkpoint.

    vlaflow compose --parents A B [C] --task pusht --search grid [--weights 0,0.1,...,1] \
        --episodes N --out DIR

Two parents: ``--weights`` lists w for the first parent (the second gets 1 - w); three or more: the grid is
every point of the simplex with step ``--grid-step``. Every candidate is scored on the same seeds through
the sim harness. DIR gets ``table.json``, ``table.md``, ``score_vs_weight.png`` and ``best/``, a checkpoint
directory (family "composed", parents embedded) that ``vlaflow eval --policy DIR/best`` loads.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

from vlaflow.errors import ConfigError

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _composed_runtime(paths, weights, reference, space, sampler, num_steps):
    """Worker-side factory (picklable through functools.partial): load parents, compose, wrap."""
    import torch

    from vlaflow.policies.composed.model import compose_policies, load_parents
    from vlaflow.policies.runtime import PolicyRuntime

    torch.set_num_threads(1)
    parents = load_parents(paths)
    pol = compose_policies(
        parents,
        weights,
        reference=reference,
        space=space,
        sampler=sampler,
        num_steps=num_steps,
        parent_paths=paths,
    )
    return PolicyRuntime(pol)


def weight_grid(n_parents: int, weights: list[float] | None, step: float) -> list[tuple[float, ...]]:
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


def add_compose_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parents", nargs="+", required=True, help="2+ denoising checkpoint directories")
    parser.add_argument("--task", default="pusht", help="sim task scoring each candidate")
    parser.add_argument("--search", default="grid", choices=["grid"], help="weight search strategy")
    parser.add_argument("--weights", default=None, help="comma list of w for the first parent (2 parents)")
    parser.add_argument("--grid-step", type=float, default=0.25, help="simplex grid step (3+ parents)")
    parser.add_argument("--episodes", type=int, default=50, help="rollouts per candidate")
    parser.add_argument("--seed", type=int, default=100000, help="first episode seed")
    parser.add_argument("--workers", type=int, default=1, help="rollout worker processes")
    parser.add_argument(
        "--reference", type=int, default=-1, help="parent driving path/grid/sampler (-1: heaviest)"
    )
    parser.add_argument("--space", default="", help="mixing parameterization ('' = reference's native)")
    parser.add_argument("--sampler", default="", help="sampler override ('' = the reference parent's)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampler steps (default: reference's)")
    parser.add_argument("--max-steps", type=int, default=None, help="episode step limit override")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["weights"][0] for r in rows]
    ax.plot(x, [r["mean_score"] for r in rows], "o-", label="mean score")
    ax.plot(x, [r["success_rate"] for r in rows], "s--", label="success rate")
    ax.set_xlabel(f"weight of {names[0]} (1 - w on {names[1]})" if len(names) == 2 else "weight of parent 0")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"GPC: {' + '.join(names)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compose(args: argparse.Namespace) -> int:
    from vlaflow.policies.checkpoint import save_checkpoint
    from vlaflow.policies.composed.model import compose_policies, load_parents
    from vlaflow.sim.evaluate import evaluate

    if len(args.parents) < 2:
        raise ConfigError(f"--parents needs at least 2 checkpoints, got {args.parents}")
    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    paths = [str(Path(p).resolve()) for p in args.parents]
    parents = load_parents(paths)  # validates family, action space and normalization up front
    compose_policies(parents, [1.0] + [0.0] * (len(parents) - 1))
    ws = None
    if args.weights:
        try:
            ws = [float(x) for x in args.weights.split(",")]
        except ValueError as e:
            raise ConfigError(f"--weights must be comma-separated numbers, got {args.weights!r}") from e
    grid = weight_grid(len(paths), ws, args.grid_step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [
        f"{Path(p).parent.parent.name}/{Path(p).name}:{q.config.family}"
        for p, q in zip(paths, parents, strict=True)
    ]
    rows = []
    for w in grid:
        factory = functools.partial(
            _composed_runtime, paths, w, args.reference, args.space, args.sampler, args.num_steps
        )
        rep = evaluate(
            factory,
            task=args.task,
            workers=args.workers,
            n_episodes=args.episodes,
            start_seed=args.seed,
            max_steps=args.max_steps,
            progress=not args.quiet,
        )
        agg = rep["aggregate"]
        rows.append(
            {
                "weights": list(w),
                "mean_score": agg["mean_score"],
                "success_rate": agg["success_rate"],
                "n_episodes": agg["n_episodes"],
                "n_errors": len(rep.get("errors", [])),
            }
        )
        print(f"w={list(w)}  score {agg['mean_score']:.3f}  success {agg['success_rate']:.2f}", flush=True)
    best = max(rows, key=lambda r: r["mean_score"])
    vertices = [r for r in rows if max(r["weights"]) == 1.0]
    table = {
        "parents": paths,
        "parent_names": names,
        "task": args.task,
        "episodes_per_weight": args.episodes,
        "seeds": [args.seed, args.seed + args.episodes - 1],
        "rows": rows,
        "best": best,
        # a vertex (one weight = 1) is a parent itself: only a true mix can beat the parents
        "best_beats_every_parent": bool(vertices)
        and max(best["weights"]) < 1.0
        and all(best["mean_score"] > v["mean_score"] for v in vertices),
    }
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    md = [
        f"# GPC on {args.task}: {' + '.join(names)}",
        "",
        f"{args.episodes} episodes per weight, seeds {args.seed}..{args.seed + args.episodes - 1}",
        "",
        "| weights | mean score | success |",
    ]
    md += ["|---|---|---|"]
    md += [f"| {r['weights']} | {r['mean_score']:.3f} | {r['success_rate']:.2f} |" for r in rows]
    md += [
        "",
        f"best: {best['weights']} ({best['mean_score']:.3f}); beats every parent: "
        f"{table['best_beats_every_parent']}",
    ]
    (out / "table.md").write_text("\n".join(md) + "\n")
    if len(paths) == 2:
        _plot(rows, names, out / "score_vs_weight.png")
    best_pol = compose_policies(
        parents,
        best["weights"],
        reference=args.reference,
        space=args.space,
        sampler=args.sampler,
        num_steps=args.num_steps,
        parent_paths=paths,
    )
    save_checkpoint(out / "best", best_pol, extra_json={"gpc_table": "../table.json"})
    print(f"best weights {best['weights']} score {best['mean_score']:.3f} -> {out / 'best'}")
    return 0
