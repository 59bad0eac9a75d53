"""``vlaflow compose``: GPC weight search by rollouts; table + plot of score vs weight; best as checkpoint.

    vlaflow compose --parents A B [C] --task pusht --search grid [--weights 0,0.1,...,1] \
        --episodes N --out DIR

Two parents: ``--weights`` lists w for the first parent (the second gets 1 - w); three or more: the grid is
every point of the simplex with step ``--grid-step``. Every candidate is scored on the same seeds through
the sim harness. DIR gets ``table.json`` (each row with its per-seed success and score, for paired
comparisons), ``table.md``, ``score_vs_weight.png`` and ``best/``, a checkpoint directory (family
"composed", parents embedded) that ``vlaflow eval --policy DIR/best`` loads.

The search itself (:mod:`vlaflow.policies.composed.search`) knows nothing of the simulator: this module
hands it a ``score(weights)`` built on :func:`vlaflow.sim.evaluate.evaluate`.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from vlaflow.atomic import OVERWRITE_HELP, atomic_directory, check_destination
from vlaflow.errors import ConfigError
from vlaflow.policies.composed.search import Weights, gpc_table, search_weights, table_markdown, weight_grid
from vlaflow.sim.evaluate import evaluate


def composed_runtime(paths, weights, reference, space, sampler, num_steps):
    """Worker-side factory (picklable through functools.partial): load parents, compose, wrap."""
    import torch

    from vlaflow.policies.checkpoint import load_parents
    from vlaflow.policies.composed.model import compose_policies
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
    parser.add_argument(
        "--out", required=True, help="output directory (table, plot, best/); must not exist, never a parent's"
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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


def _print_row(row: dict) -> None:
    print(f"w={row['weights']}  score {row['mean_score']:.3f}  success {row['success_rate']:.2f}", flush=True)


def run_compose(args: argparse.Namespace) -> int:
    from vlaflow.policies.checkpoint import load_parents  # torch: `vlaflow compose --help` stays light
    from vlaflow.policies.composed.model import compose_policies

    if len(args.parents) < 2:
        raise ConfigError(f"--parents needs at least 2 checkpoints, got {args.parents}")
    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    check_destination(args.out, overwrite=args.overwrite, sources={f"--parents {p}": p for p in args.parents})
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
    names = [
        f"{Path(p).parent.parent.name}/{Path(p).name}:{q.config.family}"
        for p, q in zip(paths, parents, strict=True)
    ]

    def score(w: Weights) -> dict:
        factory = functools.partial(
            composed_runtime, paths, w, args.reference, args.space, args.sampler, args.num_steps
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
        return {
            "mean_score": agg["mean_score"],
            "success_rate": agg["success_rate"],
            "n_episodes": agg["n_episodes"],
            "n_errors": len(rep.get("errors", [])),
            # per seed, so candidates can be compared seed by seed (paired tests; same seeds for every row)
            "episodes": [
                {"seed": e["seed"], "success": bool(e["success"]), "score": e["max_reward"]}
                for e in rep["episodes"]
            ],
        }

    rows = search_weights(grid, score, on_row=_print_row)
    table = gpc_table(
        rows, parents=paths, parent_names=names, task=args.task, episodes=args.episodes, first_seed=args.seed
    )
    best = table["best"]
    with atomic_directory(args.out, overwrite=args.overwrite, what="output directory") as out:
        _write_outputs(out, table, rows, names, paths, parents, best, args)
    out = Path(args.out)
    print(f"best weights {best['weights']} score {best['mean_score']:.3f} -> {out / 'best'}")
    return 0


def _write_outputs(out: Path, table, rows, names, paths, parents, best, args) -> None:
    """Everything compose writes, into the temp directory that then replaces --out whole."""
    from vlaflow.policies.checkpoint import save_checkpoint
    from vlaflow.policies.composed.model import compose_policies

    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "table.md").write_text(table_markdown(table))
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
