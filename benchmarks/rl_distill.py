"""RL-100's last stage measured: the one-step head distilled from an RL-refined policy, against that policy.

    # 1. the student (any teacher vlaflow distill takes; here the DSRL run's steered checkpoint)
    vlaflow distill --teacher RL_RUN/checkpoints/last --data STORE --out STUDENT \\
        --student-net unet:32,64,128 --teacher-pairs 100000 --lr 1e-3 --lr-decay cosine --chain-weight 0
    # 2. both on the same held-out seeds (100000..100199), and the student's latency
    vlaflow eval --task pusht --policy STUDENT --episodes 200 --workers 2 --out STUDENT_EVAL
    vlaflow bench latency BASE_CKPT --variants ddim:10 --onestep STUDENT --no-score --threads 1 --json \\
        --out LAT
    # 3. this script: one row, paired on the seeds
    python benchmarks/rl_distill.py --teacher-eval RL_EVAL --student STUDENT --student-eval STUDENT_EVAL \\
        --latency LAT/latency.json

The teacher's evaluation is the RL run's own held-out one (``benchmarks/rl_pusht.py`` writes it to
``OUT/after``). Target (issue 13): student success within 5 points of the RL policy at <= 2 ms p50 through
ONNX Runtime. Appends to ``benchmarks/results/rl_distill.json`` and rewrites ``rl_distill.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import append_rows, run_info  # noqa: E402
from rl_pusht import mcnemar, per_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def summary(rep: dict) -> dict:
    eps = sorted(rep["episodes"], key=lambda e: e["seed"])
    agg = rep["aggregate"]
    return {
        "policy": rep["policy"],
        "success_rate": agg["success_rate"],
        "success_ci95": agg["success_ci95"],
        "score": agg["mean_score"],
        "n_episodes": agg["n_episodes"],
        "seeds": [eps[0]["seed"], eps[-1]["seed"]],
        "first50_success": sum(e["success"] for e in eps[:50]) / min(50, len(eps)),
        "per_seed": per_seed(rep),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-eval", required=True, help="vlaflow eval --out of the RL-refined policy")
    ap.add_argument("--student", required=True, help="the distilled checkpoint (its distill.json is read)")
    ap.add_argument("--student-eval", required=True, help="vlaflow eval --out of the student, same seeds")
    ap.add_argument("--latency", required=True, help="vlaflow bench latency --json output with the student")
    ap.add_argument("--note", default="")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()

    t = summary(json.loads((Path(a.teacher_eval) / "report.json").read_text()))
    s = summary(json.loads((Path(a.student_eval) / "report.json").read_text()))
    if t["seeds"] != s["seeds"] or t["n_episodes"] != s["n_episodes"]:
        raise SystemExit(f"not the same seeds: teacher {t['seeds']} x{t['n_episodes']}, student {s['seeds']}")
    lat = json.loads(Path(a.latency).read_text())
    name = Path(a.student).name
    # bench latency names one student "one-step", several "one-step NAME"
    ort = [r for r in lat["rows"] if r["runtime"] == "onnxruntime" and r["variant"].startswith("one-step")]
    if len(ort) > 1:
        ort = [r for r in ort if r["variant"] == f"one-step {name}"]
    ref = [r for r in lat["rows"] if r["runtime"] == "onnxruntime" and "one-step" not in r["variant"]]
    if not ort:
        raise SystemExit(
            f"{a.latency}: no onnxruntime row for {name}; rows: {[r['variant'] for r in lat['rows']]}"
        )
    s_only, t_only, p = mcnemar(s["per_seed"], t["per_seed"])
    row = {
        **run_info(("vlaflow", "numpy", "torch", "onnxruntime")),
        "note": a.note,
        "teacher": t,
        "student": s,
        "distill": json.loads((Path(a.student) / "distill.json").read_text()),
        "student_ort_p50_ms": ort[0]["p50_ms"],
        "student_ort_p99_ms": ort[0]["p99_ms"],
        "reference_ort": [{k: r[k] for k in ("variant", "p50_ms", "p99_ms")} for r in ref],
        "latency_json": a.latency,
        "latency_loadavg": [lat.get("loadavg_before"), lat.get("loadavg_after")],
        "paired": {"student_only": s_only, "teacher_only": t_only, "mcnemar_p": p},
        "gap_points": round(100 * (s["success_rate"] - t["success_rate"]), 1),
        "within_5_points": s["success_rate"] >= t["success_rate"] - 0.05,
        "under_2ms": ort[0]["p50_ms"] <= 2.0,
    }
    results = Path(a.results)
    append_rows(results / "rl_distill.json", [row])
    write_md(json.loads((results / "rl_distill.json").read_text()), results / "rl_distill.md")
    return 0


def _pct(e: dict) -> str:
    lo, hi = e["success_ci95"]
    return f"{100 * e['success_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_md(rows: list[dict], path: Path) -> None:
    lines = [
        "# One-step head distilled from an RL-refined policy (benchmarks/rl_distill.py)",
        "",
        "Both on the same held-out PushT seeds (success = max coverage > 0.95, 95% interval; the harness's",
        "reset draw as in rl.md). Latency: `vlaflow bench latency`, batch 1, one thread, ONNX Runtime.",
        "",
        "| when | teacher (RL policy) | success | student | success | first 50 teacher / student "
        "| score teacher / student | gap | "
        "paired (student only : teacher only, p) | student ORT p50 / p99 ms | teacher ORT p50 (base chain) |",
        "|---|---|---|---|---|---|---|---:|---|---|---|",
    ]
    for r in rows:
        t, s, d = r["teacher"], r["student"], r["distill"]
        pr = r["paired"]
        ref = ", ".join(f"{x['variant']} {x['p50_ms']:.2f}" for x in r["reference_ort"])
        net = d.get("student_net")
        dims = d.get("student_down_dims")
        lines.append(
            f"| {r['when']} | `{t['policy']}` | {_pct(t)} | `{s['policy']}` ({net} {dims}, "
            f"{d['student_parameters'] / 1e6:.2f}M, {d['updates']} updates) | {_pct(s)} | "
            f"{100 * t['first50_success']:.0f}% / {100 * s['first50_success']:.0f}% | "
            f"{t['score']:.3f} / {s['score']:.3f} | "
            f"{r['gap_points']:+.1f} | "
            f"{pr['student_only']} : {pr['teacher_only']}, p = {pr['mcnemar_p']:.3f} | "
            f"{r['student_ort_p50_ms']:.2f} / {r['student_ort_p99_ms']:.2f} | {ref} |"
        )
    lines += ["", "Commands (this script): `" + "`; `".join(r["command"] for r in rows) + "`"]
    for r in rows:
        d = r["distill"]
        lines.append(
            f"- {r['when']}: teacher pairs {d.get('teacher_pairs')} ({d.get('teacher_set_s')} s to label), "
            f"train {d.get('train_s')} s, held-out error to the teacher "
            f"{d['val_mean_abs_err_normalized']:.4f} "
            f"(normalized units); latency from `{r['latency_json']}` (load average {r['latency_loadavg']})"
            + (f"; {r['note']}" if r["note"] else "")
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
