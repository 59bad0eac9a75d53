"""DSRL's training curves side by side: the same task and base at different SAC updates per round.

    python benchmarks/rl_update_ratio.py --run u512=/work/pp/rl_dsrl_u512/dsrl \\
        --run u128=/work/pp/rl_dsrl/dsrl --name rl_pick_place_update_ratio --note "..."

Reads each run's ``log.csv`` (training rows only: rollouts on training seeds, never the held-out ones) and
writes ``results/NAME.json`` (per run: its refine config's DSRL block, the curve of env steps, wall time,
rollout success, mean replay Q and temperature) and ``results/NAME.png`` (rollout success and Q against env
steps). With ``dsrl.reward=success dsrl.reward_offset=1`` every stored reward is -1 or 0, so a true Q lies in
[-1 / (1 - gamma^Ta), 0]: a Q above 0 is the critic overestimating, not a better policy.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("step", "elapsed_s", "env_steps", "rollout_success", "q", "alpha")


def curve(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    return [{k: float(r[k]) for k in FIELDS if r.get(k) not in (None, "")} for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (a vlaflow refine --out)")
    ap.add_argument("--name", required=True, help="results/NAME.json and NAME.png")
    ap.add_argument("--note", default="")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    runs = {}
    for item in a.run:
        label, d = item.split("=", 1)
        cfg = json.loads((Path(d) / "run_config.json").read_text())["refine"]
        runs[label] = {"run": d, "task": cfg["task"], "dsrl": cfg["dsrl"], "curve": curve(Path(d))}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in runs.items():
        c = r["curve"]
        x = [p["env_steps"] for p in c]
        a1.plot(x, [p["rollout_success"] for p in c], label=label, alpha=0.8)
        a2.plot(x, [p["q"] for p in c], label=label)
    a1.set(xlabel="real env steps", ylabel="rollout success (16 training episodes, sampled noise)")
    a2.set(xlabel="real env steps", ylabel="mean Q of a replay batch")
    a2.axhline(0.0, color="k", lw=0.8, ls="--")
    a1.legend(), a2.legend()
    fig.suptitle(f"DSRL on {next(iter(runs.values()))['task']}: SAC updates per collection round")
    fig.tight_layout()
    out = Path(a.results)
    fig.savefig(out / f"{a.name}.png", dpi=110)
    rec = {**run_info(), "note": a.note, "runs": runs}
    (out / f"{a.name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out / a.name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
