"""Merge ``vlaflow compose`` tables run on consecutive seed chunks, and compare a composite with its parents
seed by seed.

    python benchmarks/gpc_paired.py --tables /work/runs/gpc_final_0/table.json \\
        /work/runs/gpc_final_1/table.json --chosen 0.5 --out /work/runs/gpc_final

Every table must hold the same weights; the chunks' seeds must not overlap. ``--out`` gets ``table.json``
(compose's schema over all seeds, ``best`` = the ``--chosen`` weight, picked before on training seeds, not
the best on these), ``best/`` (the chosen composite's checkpoint; ``gpc_pusht_rows.py``
reads the parents' samplers there), and ``paired.json`` / ``paired.md``: per
weight the success with a 95% Wilson interval, the mean score, both on the first 50 seeds too; per parent
(w = 0 and w = 1) the seeds where only the composite succeeds, only the parent, and the exact two-sided
McNemar p (binomial on the discordant seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from rl_pusht import mcnemar  # noqa: E402

from vlaflow.sim.harness import wilson_interval  # noqa: E402


def merge(tables: list[dict]) -> dict:
    """One table over all the chunks' seeds (rows by weight, episodes in seed order)."""
    weights = [r["weights"] for r in tables[0]["rows"]]
    for t in tables[1:]:
        if [r["weights"] for r in t["rows"]] != weights or t["parents"] != tables[0]["parents"]:
            raise SystemExit("the tables differ in weights or parents")
    rows = []
    for i, w in enumerate(weights):
        eps = sorted((e for t in tables for e in t["rows"][i]["episodes"]), key=lambda e: e["seed"])
        seeds = [e["seed"] for e in eps]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"w={w}: a seed appears in two chunks")
        n = len(eps)
        rows.append(
            {
                "weights": w,
                "mean_score": sum(e["score"] for e in eps) / n,
                "success_rate": sum(e["success"] for e in eps) / n,
                "n_episodes": n,
                "n_errors": sum(t["rows"][i].get("n_errors", 0) for t in tables),
                "episodes": eps,
            }
        )
    seeds = [e["seed"] for e in rows[0]["episodes"]]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise SystemExit("the chunks' seeds are not one consecutive range")
    return {**tables[0], "episodes_per_weight": len(seeds), "seeds": [seeds[0], seeds[-1]], "rows": rows}


def summarize(table: dict, chosen: float, first: int = 50) -> dict:
    def stats(eps):
        k, n = sum(e["success"] for e in eps), len(eps)
        lo, hi = wilson_interval(k, n)
        return {
            "successes": k,
            "n": n,
            "success_rate": k / n,
            "ci95": [lo, hi],
            "mean_score": sum(e["score"] for e in eps) / n,
        }

    per_weight = [
        {"weights": r["weights"], "all": stats(r["episodes"]), f"first_{first}": stats(r["episodes"][:first])}
        for r in table["rows"]
    ]
    by_w = {r["weights"][0]: r for r in table["rows"]}
    if chosen not in by_w:
        raise SystemExit(f"--chosen {chosen} is not one of the weights {sorted(by_w)}")

    def bits(r):
        return "".join("1" if e["success"] else "0" for e in r["episodes"])

    paired = []
    for w in (0.0, 1.0):
        if w in by_w and w != chosen:
            only_c, only_p, p = mcnemar(bits(by_w[chosen]), bits(by_w[w]))
            diff = by_w[chosen]["success_rate"] - by_w[w]["success_rate"]
            paired.append(
                {
                    "parent_w": w,
                    "composite_only": only_c,
                    "parent_only": only_p,
                    "success_diff_points": 100 * diff,
                    "mcnemar_p": p,
                }
            )
    return {"seeds": table["seeds"], "chosen": chosen, "per_weight": per_weight, "paired": paired}


def markdown(s: dict, first: int = 50) -> str:
    lo, hi = s["seeds"]
    md = [
        f"seeds {lo}..{hi}",
        "",
        f"| w (first parent) | success | 95% CI | mean score | success, first {first} "
        f"| score, first {first} |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["per_weight"]:
        a, f = r["all"], r[f"first_{first}"]
        md.append(
            f"| {r['weights'][0]:g} | {a['successes']}/{a['n']} = {a['success_rate']:.3f} | "
            f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {a['mean_score']:.3f} | "
            f"{f['success_rate']:.2f} | {f['mean_score']:.3f} |"
        )
    if s["paired"]:
        md += [
            "",
            f"| composite w={s['chosen']:g} vs parent | composite only | parent only | diff (points) "
            "| McNemar p |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| w={p['parent_w']:g} | {p['composite_only']} | {p['parent_only']} | "
            f"{p['success_diff_points']:+.1f} | {p['mcnemar_p']:.3f} |"
            for p in s["paired"]
        ]
    return "\n".join(md) + "\n"


def save_composite(parents: list[str], weights: list[float], dest: Path) -> None:
    """The chosen composite as a checkpoint (compose's defaults: the heaviest parent as the reference)."""
    from vlaflow.policies.checkpoint import load_parents, save_checkpoint
    from vlaflow.policies.composed.model import compose_policies

    if dest.exists():
        shutil.rmtree(dest)
    pol = compose_policies(load_parents(parents), weights, parent_paths=parents)
    save_checkpoint(dest, pol, extra_json={"gpc_table": "../table.json"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", required=True, help="compose table.json files, one per seed chunk")
    p.add_argument("--chosen", type=float, required=True, help="the composite's w (picked on training seeds)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tables = [json.loads(Path(t).read_text()) for t in args.tables]
    table = merge(tables)
    best = next((r for r in table["rows"] if r["weights"][0] == args.chosen), None)
    if best is None:
        raise SystemExit(f"--chosen {args.chosen} is not one of the weights")
    vertices = [r for r in table["rows"] if max(r["weights"]) == 1.0]
    table["best"] = {k: v for k, v in best.items() if k != "episodes"}
    table["best_beats_every_parent"] = bool(vertices) and all(
        best["success_rate"] > v["success_rate"] for v in vertices
    )
    table["best_is"] = "the weight chosen on training seeds (not the best on these seeds); beats = success"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    save_composite(table["parents"], best["weights"], out / "best")
    s = summarize(table, args.chosen)
    (out / "paired.json").write_text(json.dumps(s, indent=1) + "\n")
    md = markdown(s)
    (out / "paired.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
