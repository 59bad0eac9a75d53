"""Append the rows of a ``vlaflow compose`` table (table.json) to ``benchmarks/results/pusht.json``.

    python benchmarks/gpc_pusht_rows.py --table DIR/table.json --name diffusion+flow --train-minutes 30 \
        --command "vlaflow compose ..."

One row per weight: policy ``gpc:<name>``, the weights, sampler (the reference parent's), nfe (network
evaluations per chunk: steps x parents with nonzero weight), mean_score, success_rate, seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._meta import append_rows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pusht.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--table", required=True)
    p.add_argument("--name", required=True, help="<parent>+<parent>")
    p.add_argument("--train-minutes", type=float, default=None, help="parents' training minutes (each)")
    p.add_argument("--command", required=True)
    args = p.parse_args(argv)
    table = json.loads(Path(args.table).read_text())
    best_dir = Path(args.table).parent / "best"
    meta = json.loads((best_dir / "config.json").read_text())["config"] if best_dir.is_dir() else {}
    steps = [c["num_inference_steps"] for c in meta.get("parent_configs", [])]
    samplers = [c["sampler"] for c in meta.get("parent_configs", [])]
    rows = []
    for r in table["rows"]:
        w = r["weights"]
        ref = max(range(len(w)), key=lambda i: (w[i], -i))
        active = sum(1 for x in w if x > 0)
        rows.append(
            {
                "policy": f"gpc:{args.name}",
                "family": "composed",
                "weights": w,
                "sampler": f"{samplers[ref]}-{steps[ref]}" if samplers else None,
                "nfe": steps[ref] * active if steps else None,
                "mean_score": round(r["mean_score"], 4),
                "success_rate": r["success_rate"],
                "train_minutes": args.train_minutes,
                "seeds": f"{table['seeds'][0]}..{table['seeds'][1]}",
                "n_episodes": r["n_episodes"],
                "parents": table["parents"],
                "best_weight": w == table["best"]["weights"],
                "command": args.command,
            }
        )
    append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
