"""The training loop's loss curve on a fixed seed, before and after a refactor of the loop.

Runs ``vlaflow train --preset PRESET`` for ``--steps`` steps with a loss row at every step (no rollouts,
no checkpoints but the last), and stores the per-step loss under ``--label`` in ``--out`` beside the
command, commit, machine and versions. With two labels in the file it prints the largest relative
difference between the curves.

    python benchmarks/loop_equivalence.py --data pusht.zarr --label before     # at the old commit
    python benchmarks/loop_equivalence.py --data pusht.zarr --label after      # at the new one
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _meta import run_info

RESULTS = Path(__file__).resolve().parent / "results"


def curve(
    preset: str, data: str, steps: int, threads: int, extra: list[str]
) -> tuple[list[str], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            "vlaflow",
            "train",
            "--preset",
            preset,
            "--data",
            data,
            "--out",
            str(run),
            f"train.steps={steps}",
            "train.log_every=1",
            "train.ckpt_every=0",
            "train.keep_step_ckpts=false",
            "eval.task=",
            f"train.num_threads={threads}",
            "train.progress=false",
            *extra,
        ]
        subprocess.run(cmd, check=True)
        with open(run / "log.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r["kind"] == "train"]
    return cmd, [float(r["loss"]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="PushT episode store (vlaflow ingest of pusht_cchi_v7)")
    ap.add_argument("--label", required=True, help="name of this curve, e.g. before / after")
    ap.add_argument("--preset", default="pusht_lowdim_diffusion")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "loop_equivalence.json"))
    ap.add_argument("overrides", nargs="*", help="extra FIELD=VALUE overrides for both curves")
    args = ap.parse_args()
    cmd, losses = curve(args.preset, args.data, args.steps, args.threads, args.overrides)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"curves": {}}
    doc["curves"][args.label] = {**run_info(), "train_command": " ".join(cmd), "loss": losses}
    if len(doc["curves"]) >= 2:
        (a, ca), (b, cb) = list(doc["curves"].items())[:2]
        n = min(len(ca["loss"]), len(cb["loss"]))
        rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(ca["loss"][:n], cb["loss"][:n], strict=True)]
        doc["comparison"] = {
            "curves": [a, b],
            "steps": n,
            "max_rel_diff": max(rel),
            "max_rel_diff_first_100": max(rel[:100]),
            "final_loss": [ca["loss"][n - 1], cb["loss"][n - 1]],
        }
        print(json.dumps(doc["comparison"], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{args.label}: {len(losses)} steps, final loss {losses[-1]:.5f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
