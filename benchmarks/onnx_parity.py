"""ONNX export parity of the benchmark checkpoints: export each, collect the parity reports into one file.

    python benchmarks/onnx_parity.py --out runs/onnx \
        diffusion=runs/bench/diffusion/checkpoints/last flow=runs/bench/flow/checkpoints/last \
        consistency=runs/onestep

Each ``NAME=CKPT`` is exported with ``vlaflow export`` (dynamo exporter, opset 18, the policy's sampler
and, for diffusion, DDPM over its training grid; ``--unrolled`` adds the fixed-step graph for diffusion
and flow). Its ``parity.json`` summary (max-abs and cosine per denoiser step and per chunk against
PyTorch, on random observations) is merged into ``benchmarks/results/onnx_parity.json`` under NAME, with
the command, machine and versions. A failing parity fails the export, and this script with it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "onnx_parity.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="NAME=CKPT pairs")
    p.add_argument("--out", required=True, help="directory for the exports (one subdirectory per NAME)")
    p.add_argument("--unrolled", type=int, default=0, help="also export a K-step unrolled graph")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    from benchmarks._meta import run_info
    from vlaflow.policies.checkpoint import read_checkpoint_meta

    path = Path(args.results)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("benchmark", "ONNX export parity vs PyTorch on the PushT benchmark checkpoints")
    data.setdefault("exports", {})
    info = run_info(("vlaflow", "torch", "onnx", "onnxruntime", "onnxscript"))
    for item in args.checkpoints:
        name, _, ckpt = item.partition("=")
        if not ckpt:
            p.error(f"expected NAME=CKPT, got {item!r}")
        out = Path(args.out) / name
        cmd = ["vlaflow", "export", ckpt, "--out", str(out)]
        family = read_checkpoint_meta(ckpt)["config"]["family"]
        if args.unrolled and family in ("diffusion", "flow"):  # a one-step student has nothing to unroll
            cmd += ["--unrolled", str(args.unrolled)]
        print("$", shlex.join(cmd), flush=True)
        res = subprocess.run(cmd, text=True, capture_output=True)
        print(res.stdout.strip())
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        rep = json.loads((out / "parity.json").read_text())
        man = json.loads((out / "manifest.json").read_text())
        data["exports"][name] = {
            "command": shlex.join(cmd),
            "checkpoint": ckpt,
            "family": man.get("family"),
            "exporter": man.get("exporter"),
            "opset": man.get("opset"),
            "passed": rep["passed"],
            "thresholds": rep["thresholds"],
            "n_obs": rep["n_obs"],
            "summary": rep["summary"],
            "run": info,
        }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
