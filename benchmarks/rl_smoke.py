"""Smoke run of ``vlaflow refine`` on PushT: evaluate a policy, refine it for a few minutes, record both.

A *smoke* run (minutes, not the issue's 2-hour budget): it shows the pipeline runs end to end and what it
costs; its success numbers say nothing about what RL refinement can reach.

    python benchmarks/rl_smoke.py --policy CKPT --out /tmp/rl_smoke --algo dppo [FIELD=VALUE ...]

Appends one row to ``benchmarks/results/rl_smoke.json`` (command, machine, versions beside the numbers).
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

RESULTS = Path(__file__).resolve().parent / "results" / "rl_smoke.json"


def vlaflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlaflow.cli", *args], capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--out", required=True, help="scratch directory for the runs (must not exist)")
    ap.add_argument("--algo", default="dppo")
    ap.add_argument("--episodes", type=int, default=50, help="held-out episodes before / after")
    ap.add_argument("--note", default="", help="what the policy is (e.g. '3-min BC, score 0.28')")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.time()
    ev = vlaflow(
        "eval", "--task", "pusht", "--policy", a.policy, "--episodes", str(a.episodes), "--workers", "2",
        "--out", str(out / "before"), "--quiet",
    )  # fmt: skip
    if ev.returncode:
        print(ev.stderr, file=sys.stderr)
        return 1
    before = json.loads((out / "before" / "report.json").read_text())["aggregate"]
    t1 = time.time()
    rf = vlaflow(
        "refine", "--policy", a.policy, "--task", "pusht", "--algo", a.algo, "--out", str(out / "refine"),
        "progress=false", f"final_episodes={a.episodes}", f"eval_episodes={a.episodes}", *a.overrides,
    )  # fmt: skip
    if rf.returncode:
        print(rf.stderr[-4000:], file=sys.stderr)
        return 1
    summary = json.loads(rf.stdout[rf.stdout.index("{") :])
    state = json.loads((out / "refine" / "checkpoints" / "last" / "train_state.json").read_text())
    rows = [r for r in (out / "refine" / "log.csv").read_text().splitlines()]
    header = rows[0].split(",")
    last_train = [dict(zip(header, r.split(","), strict=False)) for r in rows[1:] if ",train," in r][-1]
    row = {
        "kind": "smoke run (minutes; not a measurement of what RL reaches)",
        "algo": a.algo,
        "policy": a.policy,
        "policy_note": a.note,
        "overrides": a.overrides,
        "seeds": f"100000..{100000 + a.episodes - 1} (held out; training seeds from 0..99,999)",
        "before": {"score": before["mean_score"], "success_rate": before["success_rate"]},
        "evals": summary["evals"],
        "after_final": summary["final"],
        "best_score": summary["best_score"],
        "env_steps": float(last_train.get("env_steps", "nan")),
        "train_seconds": summary["train_seconds"],
        "refine_wall_s": round(time.time() - t1, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "optimizer_steps": state["step"],
        **run_info(),
    }
    append_rows(RESULTS, [row])
    print(json.dumps({k: row[k] for k in ("before", "evals", "env_steps", "refine_wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
