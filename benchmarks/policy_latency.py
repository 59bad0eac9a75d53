"""Inference latency per action chunk at batch 1 for the default PushT low-dim policies (CPU, 1 thread).

    python benchmarks/policy_latency.py [--repeats 30] [--out benchmarks/results/policy_latency.json]

Measures ``PolicyRuntime.infer`` (numpy in, numpy out: normalize, encode once, sampler loop, unnormalize)
with randomly initialized weights (latency does not depend on training). Reports median and p90 in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402

from vlaflow.policies import DiffusionConfig, FlowConfig, PolicyRuntime, build_policy  # noqa: E402


def _stats(shape, lo, hi):
    lo_a, hi_a = np.full(shape, lo, np.float32), np.full(shape, hi, np.float32)
    return {"min": lo_a, "max": hi_a, "mean": (lo_a + hi_a) / 2, "std": hi_a - lo_a, "q01": lo_a, "q99": hi_a}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "policy_latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stats = {
        "action": _stats((2,), 12, 511),
        "obs.keypoint": _stats((9, 2), 0, 512),
        "obs.agent_pos": _stats((2,), 0, 512),
    }
    obs = {
        "obs.keypoint": np.random.rand(2, 9, 2).astype(np.float32) * 512,
        "obs.agent_pos": np.random.rand(2, 2).astype(np.float32) * 512,
    }
    runs = [
        ("diffusion", DiffusionConfig(), "ddim", 10),
        ("diffusion", DiffusionConfig(), "ddpm", 100),
        ("flow", FlowConfig(), "euler", 10),
        ("flow", FlowConfig(), "heun", 10),
    ]
    rows = []
    for family, cfg, sampler, steps in tqdm(runs, desc="policies"):
        policy = build_policy(cfg, stats)
        rt = PolicyRuntime(policy, device=args.device, sampler=sampler, num_steps=steps)
        reps = max(3, args.repeats // (10 if steps >= 100 else 1))
        for _ in range(2):
            rt.infer(obs)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            rt.infer(obs)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(
            {
                "policy": f"{family}-unet-pusht-lowdim",
                "device": args.device,
                "sampler": sampler,
                "num_steps": steps,
                "params": policy.num_parameters(),
                "median_ms": float(np.median(times)),
                "p90_ms": float(np.percentile(times, 90)),
                "repeats": reps,
            }
        )
        print(json.dumps(rows[-1]))
    result = {
        **run_info(("vlaflow", "torch", "numpy")),
        "setting": f"batch 1, {args.device}, {args.threads} CPU thread(s)",
    }
    result["rows"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
