"""Is imagination a good judge? Success of several policies in a world model against the real sim.

    OMP_NUM_THREADS=1 python benchmarks/wm_ranking.py --world-model WM_DIR --out /tmp/wm_rank \\
        --policy base=CKPT[=REAL_EVAL_DIR] --policy dsrl=CKPT[=REAL_EVAL_DIR] ... [--episodes 200]

For every policy: its real PushT success on the held-out seeds (``vlaflow eval --task pusht``, or an earlier
``vlaflow eval --out`` of that checkpoint on the same seeds given as REAL_EVAL_DIR), then its success in
imagination from the same seeds' real resets (``vlaflow eval --task wm:WM_DIR``: the world model steps the
state, the checkpoint's recorded reward / success head judges it). Reports the Spearman rank correlation
between imagined and real success (and score) over the policies; the issue's target is >= 0.8 over >= 6
policies of varied quality. Appends a row to ``benchmarks/results/world_model.json`` and a section to
``world_model.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_eval(task: str, policy: str, out: Path, episodes: int, seed: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "vlaflow.cli", "eval", "--task", task, "--policy", policy, "--episodes",
           str(episodes), "--seed", str(seed), "--workers", str(workers), "--out", str(out), "--quiet",
           "--videos", "0"]  # fmt: skip
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    return summary(rep, time.time() - t0)


def summary(rep: dict, wall: float | None = None) -> dict:
    agg = rep["aggregate"]
    eps = sorted(rep["episodes"], key=lambda e: e["seed"])
    out = {
        "success_rate": agg["success_rate"],
        "success_ci95": agg.get("success_ci95"),
        "score": agg["mean_score"],
        "n_episodes": agg["n_episodes"],
        "seeds": f"{eps[0]['seed']}..{eps[-1]['seed']}",
        "wall_s": round(wall if wall is not None else agg.get("wall_s", 0.0), 1),
    }
    if "imagined" in rep:
        out["imagined"] = rep["imagined"]
    return out


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-model", required=True)
    ap.add_argument("--policy", action="append", required=True, help="NAME=CKPT[=REAL_EVAL_DIR]")
    ap.add_argument("--out", required=True, help="scratch directory (must not exist)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument(
        "--imagined-episodes", type=int, default=0, help="episodes in imagination (0: --episodes)"
    )
    ap.add_argument("--seed", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--note", default="", help="what the world model is (data, training)")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True)
    rows = []
    for spec in a.policy:
        parts = spec.split("=")
        if len(parts) not in (2, 3):
            ap.error(f"--policy {spec!r}: expected NAME=CKPT[=REAL_EVAL_DIR]")
        name, ckpt = parts[:2]
        if len(parts) == 3:
            rep = json.loads((Path(parts[2]) / "report.json").read_text())
            seeds = sorted(e["seed"] for e in rep["episodes"])
            if Path(rep["policy"]).resolve() != Path(ckpt).resolve() or seeds != list(
                range(a.seed, a.seed + a.episodes)
            ):
                ap.error(f"{parts[2]}: not an evaluation of {ckpt} on seeds {a.seed}.. x {a.episodes}")
            real = summary(rep)
        else:
            real = run_eval("pusht", ckpt, out / f"real_{name}", a.episodes, a.seed, a.workers)
        n_imag = a.imagined_episodes or a.episodes  # the first n_imag of the same seeds
        imag = run_eval(f"wm:{a.world_model}", ckpt, out / f"wm_{name}", n_imag, a.seed, a.workers)
        rows.append({"name": name, "policy": ckpt, "real": real, "imagined": imag})
        print(json.dumps({"name": name, "real": real["success_rate"], "imagined": imag["success_rate"]}))
    rs = [r["real"]["success_rate"] for r in rows]
    ims = [r["imagined"]["success_rate"] for r in rows]
    row = {
        "kind": "imagination_ranking",
        "world_model": a.world_model,
        "world_model_note": a.note,
        "episodes": a.episodes,
        "imagined_episodes": a.imagined_episodes or a.episodes,
        "seeds": f"{a.seed}..{a.seed + a.episodes - 1}",
        "policies": rows,
        "spearman_success": spearman(rs, ims) if len(rows) > 2 else None,
        "spearman_score": spearman([r["real"]["score"] for r in rows], [r["imagined"]["score"] for r in rows])
        if len(rows) > 2
        else None,
        **run_info(),
    }
    res = Path(a.results)
    append_rows(res / "world_model.json", [row])
    write_md(row, res / "world_model.md")
    print(json.dumps({k: row[k] for k in ("spearman_success", "spearman_score")}))
    return 0


def write_md(row: dict, path: Path) -> None:
    lines = [
        "",
        f"## Imagination as a judge ({row['when']}, `{row['command']}`)",
        "",
        f"World model {row['world_model']} ({row['world_model_note'] or 'see world_model.json'}).",
        f"Each policy on the held-out seeds {row['seeds']}: real PushT success vs success in imagination",
        f"from the same seeds' real resets (the first {row['imagined_episodes']}; the world model's recorded",
        "reward head judges success).",
        "",
        "| policy | real success (95% CI) | imagined success (95% CI) | real score | imagined score |",
        "|---|---|---|---|---|",
    ]

    def pct(e):
        lo, hi = e["success_ci95"] or (float("nan"), float("nan"))
        return f"{100 * e['success_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    for p in row["policies"]:
        r, i = p["real"], p["imagined"]
        lines.append(f"| {p['name']} | {pct(r)} | {pct(i)} | {r['score']:.3f} | {i['score']:.3f} |")
    ss, sc = row["spearman_success"], row["spearman_score"]
    lines += [
        "",
        f"Spearman over {len(row['policies'])} policies: success {ss:.3f}, score {sc:.3f} (target >= 0.8).",
        "",
    ]
    with open(path, "a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
